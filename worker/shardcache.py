"""Shards on a worker's disk, named by sha256, so a restart needs no new transfer."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from orchcore.errors import InvalidInputError, ShardHashError

_SHA256 = re.compile(r"[0-9a-f]{64}")


class ShardCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise InvalidInputError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / f"{sha256}.gguf"

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def list(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.gguf") if _SHA256.fullmatch(p.stem))

    def store(self, sha256: str, size: int, chunks: Iterable[bytes]) -> Path:
        """Write ``chunks`` under a temporary name; keep it only if size and hash match."""
        dest = self.path(sha256)
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
        finally:
            tmp.unlink(missing_ok=True)
        return dest
