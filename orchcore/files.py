"""Small file operations every part of orch needs the same way: replace a file whole,
read a JSON record that may be missing, hash a file, hold a lock across processes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_CHUNK = 4 << 20


def write_atomic(path: Path, text: str, *, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary name of this process,
    then ``os.replace``), creating the folder if needed. With ``mode``, the file has that
    mode from its creation on (a secret is never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if mode is None:
            tmp.write_text(text)
        else:
            tmp.unlink(missing_ok=True)
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w") as f:
                f.write(text)
            tmp.chmod(mode)  # whatever the umask took away
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; empty when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


if sys.platform == "win32":

    @contextmanager
    def locked(lock_path: Path, *, remove: bool = False) -> Iterator[None]:
        # No flock on Windows: concurrent writers each use their own temporary file and
        # os.replace keeps the result whole; they only duplicate work.
        yield

else:
    import fcntl

    @contextmanager
    def locked(lock_path: Path, *, remove: bool = False) -> Iterator[None]:
        """Hold an exclusive flock on ``lock_path`` (released when the process dies). With
        ``remove``, the lock file is deleted when the block ends, so nothing is left behind;
        a process that was waiting on the deleted file then locks a new one."""
        while True:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            with lock_path.open("a+b") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("waiting for another process holding %s", lock_path)
                    fcntl.flock(fh, fcntl.LOCK_EX)
                if not _same_file(fh.fileno(), lock_path):
                    continue  # its holder deleted it: lock the one that is there now
                try:
                    yield
                finally:
                    if remove:
                        lock_path.unlink(missing_ok=True)
                    fcntl.flock(fh, fcntl.LOCK_UN)
                return

    def _same_file(fd: int, path: Path) -> bool:
        try:
            there = path.stat()
        except FileNotFoundError:
            return False
        here = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
