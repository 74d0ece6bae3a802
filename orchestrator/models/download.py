"""``orch pull URL``: a GGUF file fetched over HTTP(S) by the one fetcher
(``orchcore.rangefetch``, the whole file as one range), resumed after a cut, checked whole,
verified, and placed atomically in the cache.

Layout, under ``cache_dir()/models/url/<first 12 hex of sha256(url)>/``::

    <file>            the verified model (only ever moved here whole)
    <file>.json       {url, sha256, size, etag}, written after verification
    <file>.part       the bytes so far; a new attempt resumes from its size ...
    <file>.part.json  ... if the file is still the version these bytes are of (ETag, size)
    <file>.lock       flock held while fetching (a second pull of the same URL waits), then
                      deleted

A file counts only once whole (``check_model_complete``: its header parses and its size is
where its last tensor ends) and verified: a sha256 that is given (by the registry) is
checked; one that is not is computed on the first complete download and recorded, never
invented. A pull that fails leaves nothing that counts: at most a part file to resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from orchcore.errors import (
    DiskFullError,
    GGUFError,
    ModelFetchError,
    SourceChangedError,
    SourceFetchError,
)
from orchcore.facts import check_model_complete
from orchcore.files import locked, read_json, write_atomic
from orchcore.ggufscan import check_file_complete
from orchcore.paths import cache_dir
from orchcore.rangefetch import Span, fetch_span
from orchestrator.models.transfer import hash_file, progress_bar

log = logging.getLogger(__name__)

CLIENT = "orchestrator"
CHANGES = 2  # a file that changes this many times during one pull is given up


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
    try:
        with locked(folder / f"{name}.lock", remove=True):
            known = _recorded(dest)
            if known is not None and sha256 in (None, known.sha256):
                return known
            _forget(dest)
            part = folder / f"{name}.part"
            got, etag = _download(url, part, progress)
            digest = _verify(url, part, got, size, sha256, progress)
            os.replace(part, dest)
            part.with_name(part.name + ".json").unlink(missing_ok=True)
            write_atomic(_record_path(dest),
                         json.dumps({"url": url, "sha256": digest, "size": got, "etag": etag}))
            return Pulled(dest, url, digest, got)
    finally:
        _remove_if_empty(folder)


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


def _record_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".json")


def _recorded(dest: Path) -> Pulled | None:
    data = read_json(_record_path(dest))
    if not {"url", "sha256", "size"} <= data.keys() or not dest.is_file() or \
            dest.stat().st_size != data["size"]:
        return None
    try:
        check_model_complete(dest)  # a record older than this check may vouch for a cut file
    except GGUFError as exc:
        log.warning("%s does not count: %s", dest, exc.problem)
        return None
    return Pulled(dest, data["url"], data["sha256"], data["size"])


def _forget(dest: Path) -> None:
    dest.unlink(missing_ok=True)
    _record_path(dest).unlink(missing_ok=True)


def _remove_if_empty(folder: Path) -> None:
    with suppress(OSError):  # not empty (or not there): it holds a model or a part to resume
        folder.rmdir()


def _download(url: str, part: Path, progress: bool) -> tuple[int, str]:
    """Fetch ``url`` into ``part``, resuming the bytes already there if they are of the
    same version; returns (size, ETag). A file that changes meanwhile is started over."""
    journal = part.with_name(part.name + ".json")
    for _ in range(CHANGES):
        span = _resumed(url, part, journal)
        if span.end is not None and span.start == span.end:
            return span.end, span.etag  # whole already (cut off before it was moved)
        try:
            with progress_bar(progress) as bar:
                task = bar.add_task(f"pulling {part.name.removesuffix('.part')}",
                                    total=span.size, completed=span.start) if bar else None
                for pos in fetch_span(span, CLIENT, on_answer=lambda s: _pin(journal, s)):
                    if bar is not None:
                        bar.update(task, total=span.end, completed=pos)
            return span.end or 0, span.etag
        except SourceChangedError as exc:
            log.info("%s; starting over", exc)
            part.unlink(missing_ok=True)
            journal.unlink(missing_ok=True)
        except (ModelFetchError, DiskFullError) as exc:
            kept = part.stat().st_size if part.exists() else 0
            if not kept:  # nothing to resume: no part, no record of its version
                part.unlink(missing_ok=True)
                journal.unlink(missing_ok=True)
            if not kept or not isinstance(exc, SourceFetchError):
                raise
            raise type(exc)(f"{exc}; {kept / (1 << 20):.1f} MiB are kept: the same command "
                            f"resumes") from None
    raise SourceChangedError(f"{url} changed {CHANGES} times while it was downloaded; try "
                             f"again later")


def _resumed(url: str, part: Path, journal: Path) -> Span:
    """The span still to fetch: from the end of ``part`` if its journal says which version
    it holds, else the whole file from byte 0."""
    pinned = read_json(journal)
    have = part.stat().st_size if part.exists() else 0
    size = pinned.get("size")
    if pinned.get("url") != url or not isinstance(size, int) or not 0 < have <= size:
        part.unlink(missing_ok=True)
        journal.unlink(missing_ok=True)
        return Span(url, part, whole=True)
    return Span(url, part, have, size, size, str(pinned.get("etag") or ""), whole=True)


def _pin(journal: Path, span: Span) -> None:
    """Record which version the part file holds, before its bytes are written."""
    write_atomic(journal, json.dumps({"url": span.url, "size": span.size, "etag": span.etag}))


def _verify(url: str, part: Path, got: int, size: int | None, sha256: str | None,
            progress: bool) -> str:
    """The sha256 of ``part`` if it is a whole model and what is expected; else it is
    deleted and the error says why."""
    def refuse(problem: str) -> ModelFetchError:
        part.unlink(missing_ok=True)
        part.with_name(part.name + ".json").unlink(missing_ok=True)
        return ModelFetchError(f"{url}: {problem} (nothing was kept)")

    if size is not None and got != size:
        raise refuse(f"got {got} bytes, expected {size}")
    try:
        check_file_complete(part)  # this file; the set is checked once all its files are here
    except GGUFError as exc:
        raise refuse(f"{exc.problem}; what the server sends is not a whole model") from None
    digest = hash_file(part, progress)
    if sha256 is not None and digest != sha256:
        raise refuse(f"the bytes hash to {digest[:12]}, not the expected {sha256[:12]}; the "
                     f"download was corrupted or the file changed")
    return digest
