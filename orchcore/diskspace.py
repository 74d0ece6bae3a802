"""Disk as a budget: before writing anything large, compare what will be written with
what is free, and say so in one line when it does not fit.

Workers never name themselves in a message (the orchestrator prefixes the worker's
address); the orchestrator's own checks name "this machine".
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from orchcore.errors import DiskFullError

MARGIN = 64 << 20  # left free beyond what is written: logs, journals, the rest of the system
THIS_MACHINE = "this machine"


def size_text(n: int) -> str:
    """Bytes as a person reads them: MiB below a GiB, GiB with one decimal above."""
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{-(-n >> 20)} MiB"


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk of ``folder`` (its nearest existing parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def full_disk(folder: Path, need: int, doing: str, free: int | None = None,
              machine: str | None = None, fix: str = "free space there or use a larger disk"
              ) -> DiskFullError:
    """The one-line error for ``need`` bytes that do not fit in ``folder``."""
    free = free_bytes(folder) if free is None else free
    where = f"{machine}: " if machine else ""
    return DiskFullError(f"{where}{doing} needs {size_text(need)} free in {folder}, "
                         f"{size_text(free)} are free; {fix}")


def require_free(folder: Path, need: int, doing: str, machine: str | None = None,
                 **fix: str) -> None:
    """Raise ``DiskFullError`` unless ``need`` bytes (and ``MARGIN``) fit in ``folder``."""
    free = free_bytes(folder)
    if need + MARGIN > free:
        raise full_disk(folder, need + MARGIN, doing, free, machine, **fix)


def is_disk_full(exc: OSError) -> bool:
    """The OS refused a write for lack of space (or of quota)."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
