"""A worker's own slice of a model, cut into its shard here: the byte ranges the
orchestrator names are fetched from where the model is published (``build``, with the
fetcher ``orch pull`` uses too) or arrive in an upload from the orchestrator
(``receive``). Either way they are written into a sparse copy, each file's header held to
its size, cut into the shard with the same code as from a whole file, and cached by
sha256: one way to build a shard, whatever the source.

An index (``fetched.json`` in the shard cache) maps what was asked (files, versions, layers,
shard format) to the shard it gave, so asking again fetches and sends nothing.

Disk is a budget: before the first byte is written, the sparse copy's bytes and the shard
cut from them must fit on the cache's disk at once; the copy goes once the shard is cached,
so at rest the disk holds one copy of the shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchcore.diskspace import free_bytes, full_disk, is_disk_full
from orchcore.errors import DiskFullError, InvalidInputError
from orchcore.facts import read_model_facts
from orchcore.files import locked, read_json, write_atomic
from orchcore.ggufread import forget_parsed_headers
from orchcore.rangefetch import RemoteFile, SparseCopy
from orchcore.shard import SHARD_FORMAT, LayerRange, write_shard
from orchcore.slices import ByteRange, shard_ranges, total_bytes, uncovered
from worker.shardcache import FIX, ShardCache

log = logging.getLogger(__name__)

DISK_MARGIN = 64 << 20

Fill = Callable[[SparseCopy], Iterator[int]]  # writes the ranges into the copy


@dataclass(frozen=True)
class Built:
    sha256: str
    size: int
    fetched: bool  # False: the index knew it, nothing was fetched


def fetch_key(files: Sequence[RemoteFile], layers: LayerRange) -> str:
    """What was asked, as the index's key: each file's URL (or, uploaded, its name), size
    and version, the layers and the shard format."""
    what = [[f.url or f.filename, f.size, f.etag] for f in files]
    what.append([layers.start, layers.end, SHARD_FORMAT])
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:32]


class SliceFetcher:
    def __init__(self, cache: ShardCache, client: str) -> None:
        self.cache, self.client = cache, client
        self.index_path = cache.root / "fetched.json"

    def known(self, key: str) -> str | None:
        sha = read_json(self.index_path).get(key)
        return sha if isinstance(sha, str) and self.cache.has(sha) else None

    def find(self, files: Sequence[RemoteFile], layers: LayerRange) -> Built | None:
        """The shard built here before for this slice, if it is still cached."""
        if (sha := self.known(fetch_key(files, layers))) is None:
            return None
        return Built(sha, self.cache.path(sha).stat().st_size, False)

    def build(self, files: Sequence[RemoteFile], ranges: Sequence[ByteRange],
              layers: LayerRange, keep: set[str]) -> Iterator[int | Built]:
        """Fetch the ranges from the files' URLs; yields bytes fetched so far, then the
        ``Built`` shard. A fetch cut short resumes from the ranges it holds."""
        return self._build(files, ranges, layers, keep, lambda copy: copy.fetch(ranges),
                           resumable=True)

    def receive(self, files: Sequence[RemoteFile], ranges: Sequence[ByteRange],
                layers: LayerRange, keep: set[str], data: Iterator[bytes]
                ) -> Iterator[int | Built]:
        """The ranges' bytes arrive in ``data`` (an upload); yields bytes written so far,
        then the ``Built`` shard."""
        return self._build(files, ranges, layers, keep,
                           lambda copy: copy.receive(ranges, data), resumable=False)

    def _build(self, files: Sequence[RemoteFile], ranges: Sequence[ByteRange],
               layers: LayerRange, keep: set[str], fill: Fill, *, resumable: bool
               ) -> Iterator[int | Built]:
        key = fetch_key(files, layers)
        if (found := self.find(files, layers)) is not None:
            yield found
            return
        work = self.cache.root / "fetching"
        work.mkdir(exist_ok=True)
        with locked(work / f"{key}.lock"):
            if (found := self.find(files, layers)) is not None:  # built meanwhile
                yield found
                return
            need = total_bytes(ranges)
            # a disk too small even without the cache's shards is no matter of the cache limit
            self._check_disk(2 * need, layers, reclaimable=self.cache.used_bytes())
            self.cache.make_room(need, keep)
            copy = SparseCopy(work / key, files, self.client)
            try:
                self._check_disk(2 * need - total_bytes(copy.held()), layers)
            except DiskFullError:
                if not copy.held():
                    copy.remove()
                raise
            try:
                yield from fill(copy)
                shard = self._cut(copy, ranges, layers, work / f"{key}.gguf")
            except OSError as exc:
                copy.remove()
                if is_disk_full(exc):
                    raise full_disk(self.cache.root, 2 * need + DISK_MARGIN,
                                    f"the shard of layers {layers}", fix=FIX) from None
                raise
            except BaseException:
                if not resumable:
                    copy.remove()
                raise
            copy.remove()
            index = read_json(self.index_path)
            index[key] = shard.sha256
            write_atomic(self.index_path, json.dumps(index))
            log.info("built shard %s for layers %s from %s (%d bytes %s)", shard.sha256[:12],
                     layers, files[0].filename, need, "fetched" if resumable else "received")
            yield Built(shard.sha256, shard.size, True)

    def _cut(self, copy: SparseCopy, ranges: Sequence[ByteRange], layers: LayerRange,
             tmp: Path) -> Built:
        copy.check_complete()  # a file cut short where it is published is no model
        facts = read_model_facts(copy.path(0))
        missing = uncovered(shard_ranges(facts, layers), ranges)
        if missing:
            raise InvalidInputError(f"the ranges asked for do not hold layers {layers}: "
                                    f"{len(missing)} ranges missing, first {missing[0]}")
        try:
            shard = write_shard(copy.path(0), layers, tmp, facts=facts, machine=None)
        finally:
            forget_parsed_headers()
        self.cache.adopt(shard.path, shard.sha256)
        return Built(shard.sha256, shard.size, True)

    def _check_disk(self, want: int, layers: LayerRange, reclaimable: int = 0) -> None:
        """``want`` bytes (the ranges not held yet, then the shard cut from them) must fit
        at once, with what evicting ``reclaimable`` bytes would free."""
        free = free_bytes(self.cache.root)
        if want + DISK_MARGIN > free + reclaimable:
            raise full_disk(self.cache.root, want + DISK_MARGIN, f"the shard of layers "
                            f"{layers} (its slice of the model, then the shard cut from it)",
                            free, fix=FIX)
