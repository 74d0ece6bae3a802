"""A worker's own slice of a published model: the byte ranges the orchestrator names are
fetched into a sparse copy (``orchcore.rangefetch``, the fetcher ``orch pull`` uses too),
each file's header held to its published size, cut into the shard with the same code as
from a whole file, and cached by sha256 like an uploaded shard.

An index (``fetched.json`` in the shard cache) maps what was asked (files, versions, layers,
shard format) to the shard it gave, so asking again fetches nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from orchcore.errors import CacheFullError, InvalidInputError
from orchcore.facts import read_model_facts
from orchcore.files import locked, read_json, write_atomic
from orchcore.ggufread import forget_parsed_headers
from orchcore.rangefetch import RemoteFile, SparseCopy
from orchcore.shard import SHARD_FORMAT, LayerRange, write_shard
from orchcore.slices import ByteRange, shard_ranges, total_bytes, uncovered
from worker.shardcache import ShardCache

log = logging.getLogger(__name__)

DISK_MARGIN = 64 << 20


@dataclass(frozen=True)
class Built:
    sha256: str
    size: int
    fetched: bool  # False: the index knew it, nothing was fetched


def fetch_key(files: Sequence[RemoteFile], layers: LayerRange) -> str:
    what = [[f.url, f.size, f.etag] for f in files] + [[layers.start, layers.end, SHARD_FORMAT]]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:32]


class SliceFetcher:
    def __init__(self, cache: ShardCache, client: str) -> None:
        self.cache, self.client = cache, client
        self.index_path = cache.root / "fetched.json"

    def known(self, key: str) -> str | None:
        sha = read_json(self.index_path).get(key)
        return sha if isinstance(sha, str) and self.cache.has(sha) else None

    def build(self, files: Sequence[RemoteFile], ranges: Sequence[ByteRange],
              layers: LayerRange, keep: set[str]) -> Iterator[int | Built]:
        """Yields bytes fetched so far, then the ``Built`` shard."""
        key = fetch_key(files, layers)
        if (sha := self.known(key)) is not None:
            yield Built(sha, self.cache.path(sha).stat().st_size, False)
            return
        work = self.cache.root / "fetching"
        work.mkdir(exist_ok=True)
        with locked(work / f"{key}.lock"):
            if (sha := self.known(key)) is not None:  # another request built it meanwhile
                yield Built(sha, self.cache.path(sha).stat().st_size, False)
                return
            need = total_bytes(ranges)
            self.cache.make_room(need, keep)
            self._check_disk(need)
            copy = SparseCopy(work / key, files, self.client)
            yield from copy.fetch(ranges)
            copy.check_complete()  # a file cut short where it is published is no model
            facts = read_model_facts(copy.path(0))
            missing = uncovered(shard_ranges(facts, layers), ranges)
            if missing:
                raise InvalidInputError(f"the ranges asked for do not hold layers {layers}: "
                                        f"{len(missing)} ranges missing, first {missing[0]}")
            tmp = work / f"{key}.gguf"
            try:
                shard = write_shard(copy.path(0), layers, tmp, facts=facts)
            finally:
                forget_parsed_headers()
            self.cache.adopt(tmp, shard.sha256)
            copy.remove()
            index = read_json(self.index_path)
            index[key] = shard.sha256
            write_atomic(self.index_path, json.dumps(index))
            log.info("built shard %s for layers %s from %s (%d bytes fetched)",
                     shard.sha256[:12], layers, files[0].filename, need)
            yield Built(shard.sha256, shard.size, True)

    def _check_disk(self, need: int) -> None:
        free = shutil.disk_usage(self.cache.root).free
        if 2 * need + DISK_MARGIN > free:  # the fetched ranges, then the shard cut from them
            raise CacheFullError(f"fetching this shard needs {2 * need >> 20} MiB of disk for "
                                 f"a moment; {free >> 20} MiB are free")
