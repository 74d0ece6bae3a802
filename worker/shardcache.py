"""Shards on a worker's disk, named by sha256, so a restart needs no new transfer.

The cache has a size limit (SD cards are small): storing a shard evicts the least
recently used shards that no loaded stage holds, until the cache fits again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from orchcore.diskspace import full_disk, is_disk_full, require_free
from orchcore.errors import CacheFullError, InvalidInputError, ShardHashError

_SHA256 = re.compile(r"[0-9a-f]{64}")
FIX = "free space there or start the worker with --cache-dir on a larger disk"


class ShardCache:
    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # Default: half of the disk space free now, counting what the cache holds already.
        self.max_bytes = max_bytes if max_bytes else (self.free_bytes() + self.used_bytes()) // 2

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._files())

    def _files(self) -> list[Path]:
        return [p for p in self.root.glob("*.gguf") if _SHA256.fullmatch(p.stem)]

    def touch(self, sha256: str) -> None:
        """Mark a shard as just used (eviction goes by least recent use)."""
        os.utime(self.path(sha256))

    def make_room(self, incoming: int, keep: set[str]) -> list[str]:
        """Evict least recently used shards, never those in ``keep``, so ``incoming`` more
        bytes fit; returns the evicted hashes. Refuses a shard larger than the limit."""
        if incoming > self.max_bytes:
            raise CacheFullError(f"a shard of {incoming >> 20} MiB does not fit the shard "
                                 f"cache limit of {self.max_bytes >> 20} MiB; raise "
                                 f"--cache-max-mb")
        files = sorted(self._files(), key=lambda p: p.stat().st_mtime)
        used = sum(p.stat().st_size for p in files)
        evicted = []
        for path in files:
            if used + incoming <= self.max_bytes:
                break
            if path.stem in keep:
                continue
            used -= path.stat().st_size
            path.unlink(missing_ok=True)
            evicted.append(path.stem)
        if used + incoming > self.max_bytes:
            raise CacheFullError(f"the shard cache ({used >> 20} MiB of "
                                 f"{self.max_bytes >> 20} MiB) is held by loaded stages; "
                                 f"raise --cache-max-mb")
        return evicted

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise InvalidInputError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / f"{sha256}.gguf"

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def list(self) -> list[str]:
        return sorted(p.stem for p in self._files())

    def adopt(self, path: Path, sha256: str) -> Path:
        """Move a shard written elsewhere on this disk (hash known) into the cache."""
        dest = self.path(sha256)
        os.replace(path, dest)
        return dest

    def store(self, sha256: str, size: int, chunks: Iterable[bytes]) -> Path:
        """Write ``chunks`` under a temporary name; keep it only if size and hash match."""
        dest = self.path(sha256)
        doing = f"shard {sha256[:12]}"
        require_free(self.root, size, doing, fix=FIX)
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=self.root)
        tmp = Path(name)
        digest, got = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    got += len(chunk)
                    if got > size:
                        raise ShardHashError(f"shard {sha256[:12]}: more than the announced "
                                             f"{size} bytes arrived")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if got != size:
                raise ShardHashError(f"shard {sha256[:12]}: {got} of {size} bytes arrived")
            if digest.hexdigest() != sha256:
                raise ShardHashError(f"shard {sha256[:12]}: received bytes hash to "
                                     f"{digest.hexdigest()[:12]}; transfer corrupted, retry")
            os.replace(tmp, dest)
        except OSError as exc:
            if is_disk_full(exc):
                raise full_disk(self.root, size, doing, fix=FIX) from None
            raise
        finally:
            tmp.unlink(missing_ok=True)
        return dest
