"""A model read where it is published: the orchestrator fetches only each file's header
(metadata, tensor table, vocabulary) with Range requests into a sparse copy, plans from it,
and each worker then fetches its own slice (``deploy``).

``published(target)`` says where a model given by URL, ``hf://`` or registry name is
published, unless this machine has it already (then it is used whole, as a file).

``RemoteRows``: rows of the token embedding, fetched by Range as the tokens the
orchestrator sends need them (tied embeddings split in two or more: stage 0 holds no table
and takes each token's row with the chunk).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from orchcore.chunks import EmbeddedRows
from orchcore.embedrows import RowTable
from orchcore.errors import ModelFetchError, SourceFetchError
from orchcore.facts import ModelFacts, TensorFacts, split_part_paths
from orchcore.rangefetch import RemoteFile, SparseCopy, describe_url, fetch_headers
from orchcore.slices import MERGE_GAP
from orchestrator.models import hub
from orchestrator.models.download import find_pulled, is_url
from orchestrator.models.registry import (
    HUB_SCHEME,
    Expected,
    HubSource,
    Learned,
    UrlSource,
    known_models,
    parse_hub_ref,
)
from orchestrator.models.store import Store, header_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteModel:
    copy: SparseCopy  # the headers, fetched
    header_bytes: int  # fetched by this run (0 when an earlier run fetched them)

    @property
    def files(self) -> tuple[RemoteFile, ...]:
        return self.copy.files

    @property
    def path(self) -> Path:
        """The sparse copy: reads as the model's facts and vocabulary, never as weights."""
        return self.copy.path(0)


def published(target: str, store: Store, notify: Callable[[str], None]
              ) -> RemoteFile | None:
    """Where ``target`` can be fetched in parts, or None when it is to be used whole: a file
    here, a model already here, or one whose sources all lack Range access."""
    if Path(target).expanduser().is_file():
        return None
    if is_url(target):
        return None if find_pulled(target, store.root / "url") else describe_url(target)
    if target.startswith(HUB_SCHEME):
        source = parse_hub_ref(target)
        return None if hub.cached(source, store.hub_cache) else _from_hub(source)
    entry = known_models().get(target)
    if entry is None or store.local_copy(entry) is not None:
        return None
    expect = Learned(store.root.parent).expected(entry)
    for source in entry.sources:
        try:
            match source:
                case HubSource():
                    return _from_hub(source, expect)
                case UrlSource(url=url):
                    return _checked(describe_url(url), expect)
        except ModelFetchError as exc:
            notify(f"{source}: {exc}")
    return None


def _from_hub(source: HubSource, expect: Expected | None = None) -> RemoteFile:
    found = hub.describe(source)  # the URL is pinned to the commit, so the bytes cannot move
    if expect is not None and None not in (expect.sha256, found.sha256) and \
            found.sha256 != expect.sha256:
        raise SourceFetchError(f"the hub's file has sha256 {found.sha256[:12]}..., not the "
                               f"registered {expect.sha256[:12]}...")
    return _checked(RemoteFile(found.url, found.size, "", Path(source.file).name), expect)


def _checked(found: RemoteFile, expect: Expected | None) -> RemoteFile:
    if expect is not None and expect.size is not None and found.size != expect.size:
        raise SourceFetchError(f"{found.url} is {found.size} bytes, not the registered "
                               f"{expect.size}: another file")
    return found


def check_header(remote: RemoteModel, expect: Expected) -> None:
    """Hold the fetched header to the registry's (or a verified download's) hash."""
    if expect.header_sha256 is not None and header_sha256(remote.path) != expect.header_sha256:
        raise SourceFetchError(f"the header of {remote.files[0].url} is not the registered "
                               f"one (sha256 differs): another or a corrupted file")


def expected_for(target: str, store: Store) -> Expected:
    entry = known_models().get(target)
    return Learned(store.root.parent).expected(entry) if entry else Expected()


def open_remote(first: RemoteFile, root: Path) -> RemoteModel:
    """Fetch the headers of ``first`` (and of the other files of its split set)."""
    copy = SparseCopy(_folder(root, [first]), [first], "orchestrator")
    fetched, (scan,) = fetch_headers(copy)
    if scan.split_count > 1:
        files = tuple(_sibling(first, name.name)
                      for name in split_part_paths(Path(first.filename), scan.split_count))
        copy = SparseCopy(_folder(root, files), files, "orchestrator")
        fetched += fetch_headers(copy)[0]
    log.info("read the headers of %s: %d bytes fetched", first.url, fetched)
    return RemoteModel(copy, fetched)


def _sibling(first: RemoteFile, name: str) -> RemoteFile:
    if name == first.filename:
        return first
    head, _, tail = first.url.rpartition(first.filename)
    return replace(describe_url(head + name + tail), name=name)


def _folder(root: Path, files: list[RemoteFile] | tuple[RemoteFile, ...]) -> Path:
    identity = json.dumps([[f.url, f.size, f.etag] for f in files])
    return root / hashlib.sha256(identity.encode()).hexdigest()[:16]


class RemoteRows:
    """Rows of the embedding ``tensor`` of a published model, in the sparse copy that holds
    its headers: those not held yet are fetched first (rows close together in one request),
    and the copy keeps them for later runs."""

    def __init__(self, copy: SparseCopy, tensor: TensorFacts) -> None:
        self._copy = copy
        self._table = RowTable.of_tensor(copy.path(tensor.part), tensor)
        self._lock = threading.Lock()
        self._held = self._table.rows_within(copy.held())

    def take(self, ids: Sequence[int]) -> EmbeddedRows:
        self._table.check(ids)
        with self._lock:
            missing = set(ids) - self._held
            if missing:
                spans = self._table.spans(missing, gap=MERGE_GAP)
                fetched = self._copy.fetch_all(spans)
                self._held |= self._table.rows_within(spans)
                log.debug("fetched %d embedding rows (%d bytes)", len(missing), fetched)
        return self._table.take(ids)

    def close(self) -> None:
        self._table.close()


def remote_rows(facts: ModelFacts, files: Sequence[RemoteFile], tensor: TensorFacts
                ) -> RemoteRows:
    """``RemoteRows`` of the model whose headers ``open_remote`` read into the sparse copy
    that ``facts`` were read from (published as ``files``)."""
    return RemoteRows(SparseCopy(facts.path.parent, files, "orchestrator"), tensor)
