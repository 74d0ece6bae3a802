"""Files on a Hugging Face hub, through ``huggingface_hub``: its cache (shared with other
tools, so a GGUF fetched by them is found, not fetched again), resume, ``HF_ENDPOINT`` and
``HF_TOKEN``. What orch adds: fast failure, a disk-space check, typed errors.

``HF_ENDPOINT`` is read at each call (the library reads it once, at import).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub as hf
from huggingface_hub import errors as hf_errors
from tqdm.auto import tqdm

from orchcore.errors import ModelFetchError
from orchestrator.models.registry import HubSource

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0  # a hub that does not answer within this fails, and the next source is tried
DISK_MARGIN = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class HubFile:
    """A hub file as the hub describes it now, pinned to a commit."""

    url: str  # the download URL at that commit (the hub redirects it to its storage)
    commit: str
    sha256: str | None  # the hub's ETag of a large (LFS) file is its sha256
    size: int


def endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


class _Quiet(tqdm):
    def __init__(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def cached(source: HubSource, cache: Path | None = None) -> Path | None:
    """The file if the hub cache already holds it (no network)."""
    got = hf.try_to_load_from_cache(source.repo, source.file, cache_dir=cache,
                                    revision=source.revision or "main")
    return Path(got) if isinstance(got, str) else None


def cached_sha256(path: Path) -> str | None:
    """The sha256 the hub gave for a cached file: the name of its blob (a large file's ETag);
    None for a small git file, whose blob is named by its git oid."""
    name = path.resolve().name
    return name if _SHA256.fullmatch(name) else None


def describe(source: HubSource) -> HubFile:
    """Ask the hub about the file (one HEAD request, no download)."""
    url = hf.hf_hub_url(source.repo, source.file, revision=source.revision or "main",
                        endpoint=endpoint())
    try:
        meta = hf.get_hf_file_metadata(url, timeout=TIMEOUT_S, endpoint=endpoint())
    except _FAILURES as exc:
        raise ModelFetchError(_reason(exc)) from None
    if meta.commit_hash is None or meta.size is None:
        raise ModelFetchError(f"the hub gave no commit or size for {source}")
    sha = (meta.etag or "").strip('"')
    pinned = hf.hf_hub_url(source.repo, source.file, revision=meta.commit_hash,
                           endpoint=endpoint())
    return HubFile(pinned, meta.commit_hash, sha if len(sha) == 64 else None, meta.size)


def download(source: HubSource, cache: Path | None = None, *, progress: bool = True
             ) -> tuple[Path, HubFile]:
    """Fetch the file into the hub cache (resuming a partial download) and return its path.

    One HEAD first: the library retries a dead endpoint for half a minute, this fails at
    once, and it gives the size for the disk check and the commit to pin.
    """
    remote = describe(source)
    _check_space(source, remote.size, cache)
    try:
        got = hf.hf_hub_download(source.repo, source.file, revision=source.revision,
                                 cache_dir=cache, endpoint=endpoint(), etag_timeout=TIMEOUT_S,
                                 tqdm_class=None if progress else _Quiet)
    except _FAILURES as exc:
        raise ModelFetchError(_reason(exc)) from None
    return Path(got), remote


def forget(path: Path) -> None:
    """Delete a cached hub file that failed verification (the blob and its link)."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def _check_space(source: HubSource, size: int, cache: Path | None) -> None:
    folder = Path(cache or hf.constants.HF_HUB_CACHE)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise ModelFetchError(f"cannot use the hub cache {folder}: {exc}") from None
    if size + DISK_MARGIN > free:
        raise ModelFetchError(f"{source} needs {size >> 20} MiB on {folder}, which has "
                              f"{free >> 20} MiB free; free some space or set HF_HUB_CACHE")


# HTTPError is the library's transport error (connection refused, timeouts).
_FAILURES = (hf_errors.HfHubHTTPError, hf_errors.HTTPError, hf_errors.OfflineModeIsEnabled,
             OSError, ValueError)


def _reason(exc: BaseException) -> str:
    match exc:
        case hf_errors.GatedRepoError():
            return "the repository is gated: accept its terms on the hub and set HF_TOKEN"
        case hf_errors.RepositoryNotFoundError():
            return "no such repository (or it is private: set HF_TOKEN)"
        case hf_errors.RevisionNotFoundError():
            return "no such revision"
        case hf_errors.EntryNotFoundError():
            return "no such file in the repository"
        case hf_errors.OfflineModeIsEnabled():
            return "offline (HF_HUB_OFFLINE is set)"
        case hf_errors.HTTPError():
            return f"cannot reach {endpoint() or hf.constants.ENDPOINT} ({exc!s:.160})"
    return f"{type(exc).__name__}: {exc!s:.200}"
