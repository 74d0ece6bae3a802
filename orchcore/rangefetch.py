"""Parts of a published GGUF file fetched with HTTP Range requests into a *sparse copy*: a
local file of the published size holding only the fetched ranges (the rest is a hole that
takes no disk). A sparse copy holding the headers reads as the model's facts and
vocabulary; one that also holds a stage's tensors is cut into the very shard the whole file
gives, by the same code.

Every answer must be a 206 whose ``Content-Range`` starts where asked and reports the
published size; plain URLs are pinned to the planned version with ``If-Match`` on the ETag
(a changed file answers 412). Done ranges are journaled, so a fetch cut short resumes
without fetching them again; a range cut mid-way resumes from its last byte.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from orchcore.errors import InvalidInputError, NoRangeError, SourceFetchError
from orchcore.files import read_json, write_atomic
from orchcore.ggufscan import HeaderScan, scan_header
from orchcore.slices import ByteRange

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0  # no answer for this long: the attempt failed
ATTEMPTS = 3  # attempts in a row that bring no byte before the fetch gives up
CHUNK = 1 << 20
FIRST_HEADER_BYTES = 1 << 20  # the header is fetched in doubling steps from this
MAX_HEADER_BYTES = 1 << 30
CLIENT_HEADER = "X-Orch-Client"  # who fetches (for the server's logs and byte counts)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


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
    serves ranges)."""
    request = urllib.request.Request(url, headers={"Range": "bytes=0-0", CLIENT_HEADER: client})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
            reply.read()
            found = _CONTENT_RANGE.fullmatch(reply.headers.get("Content-Range", ""))
            if reply.status != 206 or found is None:
                raise NoRangeError(f"{url}: the server does not answer Range requests, so "
                                   f"workers cannot fetch parts of it")
            etag = reply.headers.get("ETag", "")
    except urllib.error.HTTPError as exc:
        raise SourceFetchError(f"{url}: the server answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise SourceFetchError(f"{url}: cannot reach it ({getattr(exc, 'reason', exc)})"
                               ) from None
    weak = etag.startswith("W/")  # a weak ETag cannot pin bytes (If-Match refuses it)
    return RemoteFile(url, int(found.group(3)), "" if weak else etag)


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
            for n in self._fetch_range(r):
                done += n
                yield done
            self._note(r)

    def fetch_all(self, ranges: Sequence[ByteRange],
                  progress: Callable[[int], None] | None = None) -> int:
        done = 0
        for done in self.fetch(ranges):
            if progress is not None:
                progress(done)
        return done

    def _fetch_range(self, r: ByteRange) -> Iterator[int]:
        f = self.files[r.part]
        pos, end, fruitless, errors = r.offset, r.end, 0, []
        with self.path(f).open("r+b") as out:
            while pos < end and fruitless < ATTEMPTS:
                before = pos
                try:
                    with urllib.request.urlopen(self._request(f, pos, end),
                                                timeout=TIMEOUT_S) as reply:
                        _check_reply(f, reply, pos)
                        out.seek(pos)
                        while pos < end and (chunk := reply.read(min(CHUNK, end - pos))):
                            out.write(chunk)
                            pos += len(chunk)
                            yield len(chunk)
                except urllib.error.HTTPError as exc:
                    if exc.code == 412:
                        raise SourceFetchError(f"{f.url} changed since it was planned (its "
                                               f"ETag is no longer {f.etag}); run again") from None
                    if exc.code < 500:
                        raise SourceFetchError(f"{f.url}: the server answered {exc.code} "
                                               f"{exc.reason}") from None
                    errors.append(f"{exc.code} {exc.reason}")
                except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                    errors.append(str(getattr(exc, "reason", exc)))
                    log.info("fetch of %s cut at %d (%s); resuming", f.url, pos, errors[-1])
                fruitless = 0 if pos > before else fruitless + 1
        if pos < end:
            raise SourceFetchError(f"cannot fetch {f.url} ({'; '.join(dict.fromkeys(errors))})")

    def _request(self, f: RemoteFile, start: int, end: int) -> urllib.request.Request:
        headers = {"Range": f"bytes={start}-{end - 1}", CLIENT_HEADER: self.client}
        if f.etag:
            headers["If-Match"] = f.etag
        return urllib.request.Request(f.url, headers=headers)

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


def _check_reply(f: RemoteFile, reply: http.client.HTTPResponse, start: int) -> None:
    found = _CONTENT_RANGE.fullmatch(reply.headers.get("Content-Range", ""))
    if reply.status != 206 or found is None or int(found.group(1)) != start:
        raise SourceFetchError(f"{f.url}: the server ignored the Range request")
    if int(found.group(3)) != f.size:
        raise SourceFetchError(f"{f.url} is now {found.group(3)} bytes, not the planned "
                               f"{f.size}: it changed; run again")


def fetch_headers(copy: SparseCopy) -> tuple[int, list[HeaderScan]]:
    """Fetch each file's header and tensor table into ``copy``, doubling the prefix until
    it holds them whole; returns the bytes fetched and what each header says."""
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
                scans.append(scan)
                break
            if have >= min(f.size, MAX_HEADER_BYTES):
                raise SourceFetchError(f"{f.url}: no complete GGUF header in its first "
                                       f"{have >> 20} MiB")
            want *= 2
    return total, scans
