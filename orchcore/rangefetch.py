"""The one HTTP fetcher: bytes of a published file fetched with Range requests, resumed after
cuts, pinned to one version by its ETag, under one retry policy. A whole file is one range
(``Span`` with no end: the size comes with the first answer).

- Every answer must be a 206 whose ``Content-Range`` starts where asked and reports the
  file's size; a server without Range support answers 200, which a whole-file span takes
  (starting over from byte 0) and a part of a file refuses (``NoRangeError``).
- With an ETag known, requests carry ``If-Match``; a changed file answers 412, and
  ``SourceChangedError`` says so. Without one, the first strong ETag answered pins the rest.
- 5xx answers, connection errors, resets and timeouts are retried with a doubling backoff,
  from where the bytes stopped; ``ATTEMPTS`` attempts in a row that bring no byte end the
  fetch. 4xx answers are refused at once, naming the status.
- Room is checked before a byte is written (free disk, and the process's file size limit);
  a write that fails anyway is a ``DiskFullError`` naming the file, never a retry.

On top of it, ``SparseCopy``: ranges of a model's files in *sparse copies*, local files of
the published size holding only the fetched ranges (the rest is a hole that takes no disk),
with a journal of the ranges held, so a fetch cut short resumes without fetching them again.
A sparse copy holding the headers reads as the model's facts and vocabulary; one that also
holds a stage's tensors is cut into the very shard the whole file gives, by the same code.
"""

from __future__ import annotations

import errno
import http.client
import json
import logging
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

from orchcore.errors import (
    DiskFullError,
    GGUFError,
    InvalidInputError,
    ModelFetchError,
    NoRangeError,
    SourceChangedError,
    SourceFetchError,
)
from orchcore.files import read_json, write_atomic
from orchcore.ggufscan import (
    FIRST_HEADER_BYTES,
    MAX_HEADER_BYTES,
    HeaderScan,
    check_complete,
    scan_header,
)
from orchcore.slices import ByteRange

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0  # no answer for this long: the attempt failed
ATTEMPTS = 3  # attempts in a row that bring no byte before the fetch gives up
BACKOFF_S = 0.25  # wait before the second attempt in a row; doubles for each further one
CHUNK = 1 << 20
DISK_MARGIN = 64 << 20  # free disk kept beyond what a fetch writes
CLIENT_HEADER = "X-Orch-Client"  # who fetches (for the server's logs and byte counts)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


@dataclass(frozen=True)
class RemoteFile:
    """A published file: where, how big, which version (ETag, or pinned in the URL)."""

    url: str
    size: int
    etag: str = ""  # sent as If-Match when set
    name: str = ""

    @property
    def filename(self) -> str:
        return self.name or Path(urlparse(self.url).path).name or "model.gguf"


def describe_url(url: str, client: str = "orchestrator") -> RemoteFile:
    """Size and ETag of ``url`` from a one-byte Range request (which also proves the server
    serves ranges; a 200 answer is closed unread)."""
    request = urllib.request.Request(url, headers={"Range": "bytes=0-0", CLIENT_HEADER: client})
    try:
        with urllib.request.build_opener().open(request, timeout=TIMEOUT_S) as reply:
            found = _CONTENT_RANGE.fullmatch(reply.headers.get("Content-Range", ""))
            if reply.status != 206 or found is None:
                raise NoRangeError(f"{url}: the server does not answer Range requests, so "
                                   f"workers cannot fetch parts of it")
            reply.read()
            etag = _strong(reply.headers.get("ETag", ""))
    except urllib.error.HTTPError as exc:
        raise SourceFetchError(f"{url}: the server answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise SourceFetchError(f"{url}: cannot reach it ({getattr(exc, 'reason', exc)})"
                               ) from None
    return RemoteFile(url, int(found.group(3)), etag)


def _strong(etag: str) -> str:
    """The ETag if it can pin bytes (``If-Match`` refuses a weak one), else ""."""
    return "" if etag.startswith("W/") else etag


@dataclass
class Span:
    """Bytes ``[start, end)`` of the file at ``url``, written at the same offsets of ``path``.
    ``end``, ``size`` and ``etag`` may be unknown (None, None, ""): the first answer fills
    them in, and the rest of the fetch is held to them."""

    url: str
    path: Path
    start: int = 0
    end: int | None = None  # None: to the end of the file
    size: int | None = None  # the whole file's
    etag: str = ""
    whole: bool = False  # a 200 answer (no Range support) starts over from byte 0


def fetch_span(span: Span, client: str, *, on_answer: Callable[[Span], None] | None = None
               ) -> Iterator[int]:
    """Fetch ``span`` into its file; yields the position reached as bytes arrive (it goes
    back to 0 when a server without Range support starts the whole file over).
    ``on_answer`` is called with the span once each answer has set its size and ETag, before
    its bytes are written. Raises ``SourceFetchError`` (and subclasses), ``DiskFullError``."""
    pos, fruitless, errors = span.start, 0, []
    span.path.parent.mkdir(parents=True, exist_ok=True)
    with span.path.open("r+b" if span.path.exists() else "w+b") as out:
        while span.end is None or pos < span.end:
            before = pos
            try:
                with urllib.request.build_opener().open(_request(span, pos, client),
                                            timeout=TIMEOUT_S) as reply:
                    pos = _accept(span, reply, pos, out)
                    if on_answer is not None:
                        on_answer(span)
                    yield pos
                    for reached in _body(span, reply, pos, out):
                        pos = reached
                        yield pos
                    if span.end is None:  # a body of unknown length ended: that was all
                        span.end = span.size = pos
            except urllib.error.HTTPError as exc:
                errors.append(_refused(span, exc))
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                errors.append(str(getattr(exc, "reason", exc)) or type(exc).__name__)
            if span.end is not None and pos >= span.end:
                break
            fruitless = 0 if pos > before else fruitless + 1
            if fruitless >= ATTEMPTS:
                raise SourceFetchError(f"cannot fetch {span.url} "
                                       f"({'; '.join(dict.fromkeys(errors))})")
            log.info("fetch of %s stopped at byte %d (%s); resuming", span.url, pos,
                     errors[-1] if errors else "connection closed")
            if fruitless:
                time.sleep(BACKOFF_S * 2 ** (fruitless - 1))


def _request(span: Span, pos: int, client: str) -> urllib.request.Request:
    last = "" if span.end is None else str(span.end - 1)
    headers = {"Range": f"bytes={pos}-{last}", CLIENT_HEADER: client}
    if span.etag:
        headers["If-Match"] = span.etag
    return urllib.request.Request(span.url, headers=headers)


def _accept(span: Span, reply: http.client.HTTPResponse, pos: int, out: IO[bytes]) -> int:
    """Check an answer against the span, learn what it did not know; returns where its body
    starts (0 when a whole-file span starts over)."""
    etag = _strong(reply.headers.get("ETag", ""))
    if span.etag and etag and etag != span.etag:
        raise SourceChangedError(f"{span.url} changed while it was fetched (its ETag is no "
                                 f"longer {span.etag}); run again")
    if reply.status == 206:
        found = _CONTENT_RANGE.fullmatch(reply.headers.get("Content-Range", ""))
        if found is None or int(found.group(1)) != pos:
            raise SourceFetchError(f"{span.url}: the server answered another range than the "
                                   f"one asked for (from byte {pos})")
        size = int(found.group(3))
    elif reply.status == 200 and span.whole:
        pos = 0
        out.truncate(0)
        size = int(length) if (length := reply.headers.get("Content-Length")) else None
        span.end = size
    else:
        raise NoRangeError(f"{span.url}: the server ignored the Range request (answered "
                           f"{reply.status})")
    if size is not None and span.size is not None and size != span.size:
        raise SourceChangedError(f"{span.url} is now {size} bytes, not the planned "
                                 f"{span.size}: it changed; run again")
    span.size = span.size if size is None else size
    span.end = span.size if span.end is None else span.end
    span.etag = span.etag or etag
    if span.end is not None:
        check_room(span.path, pos, span.end)
    return pos


def _body(span: Span, reply: http.client.HTTPResponse, pos: int, out: IO[bytes]
          ) -> Iterator[int]:
    out.seek(pos)
    while span.end is None or pos < span.end:
        want = CHUNK if span.end is None else min(CHUNK, span.end - pos)
        if not (chunk := reply.read(want)):
            return
        try:
            out.write(chunk)
        except OSError as exc:  # the disk, not the network: no retry
            raise _write_error(span.path, pos, span.end, exc) from None
        pos += len(chunk)
        yield pos


def _refused(span: Span, exc: urllib.error.HTTPError) -> str:
    """Raise for an answer no retry can change; the reason to retry a 5xx."""
    if exc.code == 412:
        raise SourceChangedError(f"{span.url} changed since it was planned (its ETag is no "
                                 f"longer {span.etag}); run again") from None
    if exc.code < 500:
        raise SourceFetchError(f"{span.url}: the server answered {exc.code} {exc.reason}"
                               ) from None
    return f"{exc.code} {exc.reason}"


def check_room(path: Path, pos: int, end: int, margin: int = DISK_MARGIN) -> None:
    """Raise ``DiskFullError`` unless bytes ``[pos, end)`` of ``path`` can be written: the
    disk has room for them (plus ``margin``) and the file size limit (``ulimit -f``) lets
    the file reach ``end``."""
    limit = _file_size_limit()
    if limit is not None and end > limit:
        raise DiskFullError(f"{path} needs {_mib(end)} MiB but this process may write files "
                            f"of {_mib(limit)} MiB at most (ulimit -f); raise that limit")
    folder = path.parent
    free = shutil.disk_usage(folder).free
    if end - pos + margin > free:
        raise DiskFullError(f"{path} needs {_mib(end - pos)} MiB more on {folder}, which has "
                            f"{_mib(free)} MiB free; free some space or set ORCH_CACHE_DIR "
                            f"to a folder on a larger disk")


def _file_size_limit() -> int | None:
    if sys.platform == "win32":
        return None
    import resource

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _write_error(path: Path, pos: int, end: int | None, exc: OSError) -> ModelFetchError:
    if exc.errno not in _NO_ROOM:
        return ModelFetchError(f"cannot write {path}: {exc.strerror or exc}")
    free = shutil.disk_usage(path.parent).free
    needs = f"{_mib(end - pos)} MiB more" if end is not None else "more"
    return DiskFullError(f"cannot write {path} ({exc.strerror}): it needs {needs}, "
                         f"{path.parent} has {_mib(free)} MiB free")


def _mib(n: int) -> int:
    return -(-n >> 20)


class SparseCopy:
    """Sparse local copies of a model's files in ``folder``, under their own names (so a
    split set reads as one), with a journal of the ranges they hold."""

    def __init__(self, folder: Path, files: Sequence[RemoteFile], client: str) -> None:
        self.folder, self.files, self.client = folder, tuple(files), client
        self.journal = folder / "ranges.json"
        folder.mkdir(parents=True, exist_ok=True)
        if read_json(self.journal).get("files") != self._identity():
            for path in folder.iterdir():
                path.unlink()
        for f in self.files:
            path = self.path(f)
            if not path.exists():
                with path.open("wb") as fh:
                    fh.truncate(f.size)

    def _identity(self) -> list[list]:
        return [[f.url, f.size, f.etag] for f in self.files]

    def path(self, file: RemoteFile | int = 0) -> Path:
        f = self.files[file] if isinstance(file, int) else file
        return self.folder / f.filename

    def held(self) -> list[ByteRange]:
        return [ByteRange(*r) for r in read_json(self.journal).get("ranges", [])]

    def _note(self, r: ByteRange) -> None:
        ranges = [*self.held(), r]
        write_atomic(self.journal, json.dumps({"files": self._identity(),
                                               "ranges": [list(x.__dict__.values())
                                                          for x in ranges]}))

    def fetch(self, ranges: Sequence[ByteRange]) -> Iterator[int]:
        """Fetch the ranges not held yet; yields the bytes fetched so far as they arrive."""
        held = set(self.held())
        done = 0
        for r in ranges:
            if r in held or r.length == 0:
                continue
            f = self.files[r.part]
            span = Span(f.url, self.path(f), r.offset, r.end, f.size, f.etag)
            pos = r.offset
            for reached in fetch_span(span, self.client):
                done += reached - pos
                pos = reached
                yield done
            self._note(r)

    def fetch_all(self, ranges: Sequence[ByteRange],
                  progress: Callable[[int], None] | None = None) -> int:
        done = 0
        for done in self.fetch(ranges):
            if progress is not None:
                progress(done)
        return done

    def check_complete(self) -> None:
        """Raise ``SourceFetchError`` unless every file's header (fetched) describes a whole
        file of its published size."""
        for f in self.files:
            scan = _read_header(self.path(f), f.size)
            if scan is None:
                raise SourceFetchError(f"{f.url}: no complete GGUF header in its first "
                                       f"{_mib(min(f.size, MAX_HEADER_BYTES))} MiB")
            check_published(f, scan)

    def receive(self, ranges: Sequence[ByteRange], data: Iterator[bytes]) -> Iterator[int]:
        """Write ``ranges`` from ``data``, their bytes one after the other as an upload
        sends them; yields the bytes written so far. ``data`` must hold exactly that much."""
        done, rest = 0, b""
        for r in ranges:
            with self.path(r.part).open("r+b") as out:
                out.seek(r.offset)
                left = r.length
                while left:
                    chunk = rest or next(data, b"")
                    if not chunk:
                        raise InvalidInputError(f"the upload ended after {done} bytes of "
                                                f"{sum(x.length for x in ranges)}")
                    out.write(chunk[:left])
                    rest, n = chunk[left:], min(left, len(chunk))
                    left, done = left - n, done + n
                    yield done
            self._note(r)
        if rest or next(data, b""):
            raise InvalidInputError(f"the upload holds more than the {done} bytes of its "
                                    f"ranges")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _read_header(path: Path, size: int) -> HeaderScan | None:
    """The header of the file at ``path``, read in a doubling prefix (a worker's memory is
    its budget: the whole ``MAX_HEADER_BYTES`` is read only for a header that large)."""
    want = min(size, FIRST_HEADER_BYTES)
    with path.open("rb") as fh:
        while True:
            fh.seek(0)
            scan = scan_header(fh.read(want))
            if scan is not None or want >= min(size, MAX_HEADER_BYTES):
                return scan
            want = min(size, MAX_HEADER_BYTES, 2 * want)


def check_published(f: RemoteFile, scan: HeaderScan) -> None:
    """Raise ``SourceFetchError`` unless the header ``scan`` describes a whole file of the
    published size (a file cut short on the server never counts as a model)."""
    try:
        check_complete(scan, f.size, f.filename)
    except GGUFError as exc:
        raise SourceFetchError(f"{f.url} is not a whole model file ({exc.problem})") from None


def fetch_headers(copy: SparseCopy) -> tuple[int, list[HeaderScan]]:
    """Fetch each file's header and tensor table into ``copy``, doubling the prefix until
    it holds them whole; returns the bytes fetched and what each header says. Each header
    is held to its file's published size (``check_published``)."""
    total, scans = 0, []
    for part, f in enumerate(copy.files):
        have, want = 0, FIRST_HEADER_BYTES
        while True:
            want = min(want, f.size)
            total += copy.fetch_all([ByteRange(part, have, want - have)])
            have = want
            with copy.path(part).open("rb") as fh:
                scan = scan_header(fh.read(have))
            if scan is not None:
                check_published(f, scan)
                scans.append(scan)
                break
            if have >= min(f.size, MAX_HEADER_BYTES):
                raise SourceFetchError(f"{f.url}: no complete GGUF header in its first "
                                       f"{_mib(have)} MiB")
            want *= 2
    return total, scans
