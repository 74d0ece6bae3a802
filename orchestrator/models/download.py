"""``orch pull URL``: a GGUF file fetched over HTTP(S), resumed after a cut, verified, and
placed atomically in the cache.

Layout, under ``cache_dir()/models/url/<first 12 hex of sha256(url)>/``::

    <file>          the verified model (only ever moved here whole)
    <file>.part     the bytes so far; a new attempt resumes from its size (Range)
    <file>.json     {url, sha256, size, etag}, written after verification
    <file>.lock     flock held while fetching: a second pull of the same URL waits

A sha256 that is given (by the registry) is checked; one that is not is computed on the
first complete download and recorded, never invented.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from gguf.constants import GGUF_MAGIC

from orchcore.errors import ModelFetchError
from orchcore.files import locked, read_json, sha256_file, write_atomic
from orchcore.paths import cache_dir
from orchcore.rangefetch import CLIENT_HEADER
from orchestrator.models.transfer import CHUNK, progress_bar

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0  # a source that does not answer within this fails, and the next is tried
ATTEMPTS = 2  # connections in a row that may bring nothing before the pull gives up
DISK_MARGIN = 64 << 20  # free space kept beyond the file


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


@dataclass(frozen=True)
class Pulled:
    path: Path
    url: str
    sha256: str
    size: int


def url_folder(url: str, root: Path | None = None) -> Path:
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return (root or cache_dir() / "models" / "url") / digest


def find_pulled(url: str, root: Path | None = None) -> Pulled | None:
    """The verified file pulled from ``url`` earlier, if it is still there."""
    folder = url_folder(url, root)
    return _recorded(folder / (Path(urlparse(url).path).name or "model.gguf"))


def pull_url(url: str, *, sha256: str | None = None, size: int | None = None,
             root: Path | None = None, progress: bool = True, folder: Path | None = None
             ) -> Pulled:
    """The model at ``url``, from the cache when it is there and verified. ``folder``: put
    it there rather than in its own (the later files of a split set join the first)."""
    name = Path(urlparse(url).path).name or "model.gguf"
    folder = folder or url_folder(url, root)
    dest = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder / f"{name}.lock"):
        known = _recorded(dest)
        if known is not None and sha256 in (None, known.sha256):
            return known
        dest.unlink(missing_ok=True)
        part = folder / f"{name}.part"
        got, etag = _fetch(url, part, progress)
        digest = sha256_file(part)
        if size is not None and got != size:
            part.unlink(missing_ok=True)
            raise ModelFetchError(f"{url}: got {got} bytes, expected {size} (nothing was kept)")
        if sha256 is not None and digest != sha256:
            part.unlink(missing_ok=True)
            raise ModelFetchError(f"{url}: the bytes hash to {digest[:12]}, not the expected "
                                  f"{sha256[:12]}; the download was corrupted or the file "
                                  f"changed (nothing was kept)")
        with part.open("rb") as fh:
            if int.from_bytes(fh.read(4), "little") != GGUF_MAGIC:
                part.unlink(missing_ok=True)
                raise ModelFetchError(f"{url}: not a GGUF file (nothing was kept)")
        os.replace(part, dest)
        write_atomic(folder / f"{name}.json",
                     json.dumps({"url": url, "sha256": digest, "size": got, "etag": etag}))
        return Pulled(dest, url, digest, got)


def pulled_files(root: Path | None = None) -> list[Pulled]:
    """Every verified file pulled by URL."""
    base = root or cache_dir() / "models" / "url"
    found = [_recorded(meta.with_suffix("")) for meta in sorted(base.glob("*/*.json"))]
    return [p for p in found if p is not None]


def remove_pulled(target: str, root: Path | None = None) -> list[Path]:
    """Delete pulled files whose URL or file name is ``target``; returns what went."""
    gone = []
    for pulled in pulled_files(root):
        if target in (pulled.url, pulled.path.name):
            for extra in (pulled.path, pulled.path.with_name(pulled.path.name + ".json")):
                extra.unlink(missing_ok=True)
            gone.append(pulled.path)
    return gone


def _recorded(dest: Path) -> Pulled | None:
    data = read_json(dest.with_name(dest.name + ".json"))
    if not {"url", "sha256", "size"} <= data.keys() or not dest.is_file() or \
            dest.stat().st_size != data["size"]:
        return None
    return Pulled(dest, data["url"], data["sha256"], data["size"])


def _fetch(url: str, part: Path, progress: bool) -> tuple[int, str]:
    """Download into ``part``, resuming from its size; returns (size, etag)."""
    errors = []
    total: int | None = None
    etag = ""
    with progress_bar(progress) as bar:
        task = bar.add_task(f"pulling {part.name.removesuffix('.part')}", total=None) \
            if bar else None
        fruitless = 0
        while fruitless < ATTEMPTS:  # every connection that brings bytes earns another one
            have = before = part.stat().st_size if part.exists() else 0
            if total is not None and have == total:
                return total, etag
            headers = {CLIENT_HEADER: "orchestrator"} | ({"Range": f"bytes={have}-"}
                                                         if have else {})
            request = urllib.request.Request(url, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
                    if have and reply.status != 206:  # no resume: start over
                        have = 0
                        part.unlink(missing_ok=True)
                    length = int(reply.headers.get("Content-Length", "0") or 0)
                    total = have + length if length else total
                    etag = reply.headers.get("ETag", etag) or etag
                    if total is not None:
                        _check_space(part.parent, total - have, url)
                    if bar is not None:
                        bar.update(task, total=total, completed=have)
                    with part.open("ab") as out:
                        while chunk := reply.read(CHUNK):
                            out.write(chunk)
                            if bar is not None:
                                bar.advance(task, len(chunk))
                have = part.stat().st_size
                if total is None or have == total:
                    return have, etag
                errors.append(f"connection closed at {have} of {total} bytes")
            except ModelFetchError:
                raise
            except urllib.error.HTTPError as exc:
                raise ModelFetchError(f"{url}: the server answered {exc.code} {exc.reason}"
                                      ) from None
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
                errors.append(str(getattr(exc, "reason", exc)))
                log.info("pull of %s interrupted (%s); resuming", url, errors[-1])
            got = part.stat().st_size if part.exists() else 0
            fruitless = 0 if got > before else fruitless + 1
    kept = part.stat().st_size if part.exists() else 0
    again = (f"; {kept >> 20} MiB are kept: the same command resumes" if kept else "")
    raise ModelFetchError(f"{url}: cannot download it ({'; '.join(dict.fromkeys(errors))})"
                          f"{again}")


def _check_space(folder: Path, needed: int, url: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed + DISK_MARGIN > free:
        raise ModelFetchError(f"{url}: needs {needed >> 20} MiB more on {folder}, which has "
                              f"{free >> 20} MiB free; free some space or set ORCH_CACHE_DIR")
