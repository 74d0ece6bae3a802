"""Byte copying with a running sha256 and a progress bar, for every way a model arrives."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

CHUNK = 1 << 20


def copy_hashing(src: IO[bytes], dst: IO[bytes] | None, bar: Progress | None,
                 task: TaskID | None, *, limit: int) -> tuple[int, str]:
    """Copy in chunks, hashing as we go; return (bytes read, sha256 hex).

    Stops one chunk past ``limit``, so an oversized source shows as a size mismatch.
    """
    digest = hashlib.sha256()
    total = 0
    while total <= limit and (chunk := src.read(CHUNK)):
        digest.update(chunk)
        if dst is not None:
            dst.write(chunk)
        total += len(chunk)
        if bar is not None and task is not None:
            bar.advance(task, len(chunk))
    return total, digest.hexdigest()


def hash_file(path: Path, progress: bool) -> str:
    """sha256 of a file, with a bar when ``progress``."""
    size = path.stat().st_size
    with progress_bar(progress) as bar, path.open("rb") as fh:
        task = bar.add_task(f"verifying {path.name}", total=size) if bar else None
        return copy_hashing(fh, None, bar, task, limit=size)[1]


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress | None]:
    """A transfer bar on stderr (bytes, rate, time left), or None."""
    if not enabled:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True)) as bar:
        yield bar
