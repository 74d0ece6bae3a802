"""A real threaded HTTP server on loopback for tests: in-memory files served as plain URLs and
through an emulation of the Hugging Face hub, with knobs to cut, corrupt, fail or stall.

    with serve({"tiny.gguf": data}) as server:
        server.url("tiny.gguf")                      # http://127.0.0.1:PORT/tiny.gguf
        commit = server.add_hub_file("org/repo", "m.gguf", data)
        hf_hub_download("org/repo", "m.gguf", endpoint=server.hub_endpoint, ...)

Plain files, `/<name>`: GET and HEAD, `Range: bytes=A-`, `bytes=A-B`, `bytes=-N` (206 with
`Content-Range`), `ETag` ('"' + sha256[:16] + '"'), `Accept-Ranges: bytes`, `If-Match` (412),
`If-None-Match` (304), `If-Range` (a mismatch answers the full 200). 404 for unknown names.

Hub, `/{repo_id}/resolve/{revision}/{filename}` (revision: a commit or "main"): answered like
the real hub answers an LFS file: a 302 whose `Location` is a CDN URL on a second port (another
origin, so huggingface_hub does not follow it on HEAD, exactly as with the real CDN host),
carrying `X-Repo-Commit`, `X-Linked-Etag` (the quoted full sha256), `X-Linked-Size` and an
`ETag` (the git oid of the LFS pointer, as the real hub sends). The CDN URL `/cdn/<sha256>`
serves the bytes with Range support and ETag '"<sha256>"'. With `hub_redirect = False` the
resolve URL answers the bytes itself (200/206) with the same hub headers. Errors carry
`X-Error-Code`: `RepoNotFound` (404), `RevisionNotFound` (404), `EntryNotFound` (404, with
`X-Repo-Commit`), `GatedRepo` (401, for repos in `gated`). Minimal `GET /api/models/{repo_id}`
and `/api/models/{repo_id}/revision/{rev}` answer `{"id", "sha", "siblings", ...}` (not needed
by `hf_hub_download`, which makes only the HEAD and the GET). `GET /api/agent-harnesses`
answers an empty registry: huggingface_hub 2.4 fetches it from `constants.ENDPOINT` once per
process while building its User-Agent (unless HF_HUB_DISABLE_TELEMETRY=1).

Knobs (plain attributes, settable any time): `cut_after`/`cuts` (end a file body after
`cut_after` bytes, `cuts` times), `corrupt` (flip the byte at offset size // 2 of the file
whenever a body covers it: a file assembled from ranges has exactly one bad byte),
`fail_status` (every request answers it; after `fail_after` requests answered as usual; with
`fail_times`, only that many, then it clears), `stall` (requests are read, never answered, until
cleared or the server closes), `hub_redirect`, `gated`. Accounting (under `lock`), of file
bytes only (200/206 bodies actually written; not error texts, JSON or redirects):
`served_bytes`, `served_by_path` (by URL path, without the query), `served_by_client` (keyed by
the `X-Orch-Client` request header, default "anon"); and `requests`, every request as
(method, path, Range header or "")."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

CLIENT_HEADER = "X-Orch-Client"
_CHUNK = 64 * 1024


def plain_etag(data: bytes) -> str:
    """The ETag a plain URL answers for `data`: quoted, the first 16 hex digits of its sha256."""
    return '"' + hashlib.sha256(data).hexdigest()[:16] + '"'


def default_commit(repo_id: str, salt: str = "") -> str:
    """A stable 40-hex commit id for a repo (used when `add_hub_file` gets no revision)."""
    return hashlib.sha1(f"{repo_id}\0{salt}".encode()).hexdigest()


def lfs_pointer_oid(sha256: str, size: int) -> str:
    """Git blob oid of the LFS pointer file: what the real hub sends as `ETag` on a resolve."""
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
    blob = pointer.encode()
    return hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()


@dataclass
class _Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    main: str | None = None


@dataclass
class _Reply:
    status: int
    headers: list[tuple[str, str]]
    data: bytes = b""  # the whole file (or an error text) ...
    start: int = 0  # ... of which the body is data[start:end]
    end: int = 0
    is_file: bool = False  # file bytes (200/206): counted, and subject to cut and corrupt


class FileServer:
    """The server. Prefer `serve(...)`; or `FileServer(files).start()` ... `.close()`."""

    def __init__(self, files: Mapping[str, bytes] | None = None) -> None:
        self.lock = threading.RLock()
        self.files: dict[str, bytes] = dict(files or {})
        self.repos: dict[str, _Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes, served by the CDN
        # Knobs.
        self.cut_after: int | None = None  # close a body after this many bytes ...
        self.cuts: int = 1  # ... this many times (decremented per cut body)
        self.corrupt: bool = False  # flip the byte at offset size // 2 when it is in a body
        self.fail_status: int | None = None  # answer every request with this status ...
        self.fail_after: int = 0  # ... once this many requests were answered as usual ...
        self.fail_times: int | None = None  # ... this many times, then clear it (None: all)
        self.stall: bool = False  # read requests, answer nothing until cleared or closed
        self.hub_redirect: bool = True  # resolve answers 302 to the CDN (like the real hub)
        self.gated: set[str] = set()  # repo ids that answer 401 GatedRepo
        # Clients (X-Orch-Client) served; others have their connection closed unanswered,
        # as if the server could not be reached from where they are. None: everyone.
        self.only_clients: set[str] | None = None
        # Accounting.
        self.served_bytes = 0
        self.served_by_path: dict[str, int] = {}
        self.served_by_client: dict[str, int] = {}
        self.requests: list[tuple[str, str, str]] = []
        self._stop = threading.Event()
        self._httpd: list[_HTTPServer] = []
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FileServer:
        for cdn in (False, True):  # the CDN listens on its own port: another origin
            httpd = _HTTPServer(self, cdn)
            thread = threading.Thread(
                target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            self._httpd.append(httpd)
            self._threads.append(thread)
        return self

    def close(self) -> None:
        """Stop quickly: stalled handlers are released, open connections are closed."""
        self._stop.set()
        for httpd in self._httpd:
            httpd.shutdown()
            httpd.server_close()
            httpd.close_connections()
        for thread in self._threads:
            thread.join(timeout=2)

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._httpd[0].server_address[1]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hub_endpoint(self) -> str:
        """Pass as `endpoint=` to huggingface_hub, or as HF_ENDPOINT to a new process."""
        return self.base

    @property
    def cdn_base(self) -> str:
        return f"http://127.0.0.1:{self._httpd[1].server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def hub_url(self, repo_id: str, filename: str, revision: str = "main") -> str:
        return f"{self.base}/{repo_id}/resolve/{revision}/{filename}"

    def cdn_url(self, data: bytes) -> str:
        return f"{self.cdn_base}/cdn/{hashlib.sha256(data).hexdigest()}"

    # -- content ---------------------------------------------------------------------------

    def add_file(self, name: str, data: bytes) -> str:
        with self.lock:
            self.files[name.lstrip("/")] = bytes(data)
        return self.url(name.lstrip("/"))

    def add_hub_file(
        self, repo_id: str, filename: str, data: bytes, revision: str | None = None
    ) -> str:
        """Add `filename` to `repo_id` at commit `revision` (40 lowercase hex; default: the
        repo's current main, or a stable id for a new repo). A new commit starts from the files
        of the current main; "main" then points at it. Returns the commit."""
        with self.lock:
            current = self.repos[repo_id].main if repo_id in self.repos else None
            commit = revision or current or default_commit(repo_id)
            if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
                raise ValueError(f"revision must be a 40-hex commit id, not {commit!r}")
            repo = self.repos.setdefault(repo_id, _Repo())
            if commit not in repo.commits:
                repo.commits[commit] = dict(repo.commits.get(repo.main or "", {}))
            repo.commits[commit][filename] = bytes(data)
            repo.main = commit
            self.blobs[hashlib.sha256(data).hexdigest()] = bytes(data)
            return commit

    def reset_counters(self) -> None:
        with self.lock:
            self.served_bytes = 0
            self.served_by_path.clear()
            self.served_by_client.clear()
            self.requests.clear()

    def requests_for(self, path: str) -> list[tuple[str, str, str]]:
        with self.lock:
            return [r for r in self.requests if r[1] == path]

    # -- answering -------------------------------------------------------------------------

    def _reply(self, method: str, path: str, headers: Mapping[str, str], cdn: bool) -> _Reply:
        with self.lock:
            if self.fail_status is not None and self.fail_after > 0:
                self.fail_after -= 1
            elif self.fail_status is not None:
                status = self.fail_status
                if self.fail_times is not None:
                    self.fail_times -= 1
                    if self.fail_times <= 0:
                        self.fail_status = self.fail_times = None
                return _error(status, f"failing with {status}")
            if cdn:
                data = (
                    self.blobs.get(path.removeprefix("/cdn/")) if path.startswith("/cdn/") else None
                )
                if data is None:
                    return _error(404, "no such blob")
                sha = hashlib.sha256(data).hexdigest()
                extra = [("Content-Disposition", f'attachment; filename="{sha}";')]
                return _ranged(data, headers, f'"{sha}"', extra)
            if path == "/api/agent-harnesses":  # fetched once per process by build_hf_headers
                text = json.dumps({"standardEnvVars": [], "harnesses": {}}).encode()
                return _Reply(200, [("Content-Type", "application/json")], text, 0, len(text))
            if path.startswith("/api/models/"):
                return self._api_model(path.removeprefix("/api/models/"))
            if "/resolve/" in path:
                return self._resolve(method, path, headers)
            data = self.files.get(path.lstrip("/"))
            if data is None:
                return _error(404, "not found")
            return _ranged(data, headers, plain_etag(data), [])

    def _find(self, repo_id: str) -> tuple[_Repo | None, _Reply | None]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, _error(404, "Repository not found", "RepoNotFound")
        if repo_id in self.gated:
            return None, _error(401, f"Access to model {repo_id} is restricted.", "GatedRepo")
        return repo, None

    def _resolve(self, method: str, path: str, headers: Mapping[str, str]) -> _Reply:
        repo_part, _, rest = path.lstrip("/").partition("/resolve/")
        revision, _, filename = rest.partition("/")
        repo, err = self._find(repo_part)
        if err is not None:
            return err
        assert repo is not None
        commit = repo.main if revision == "main" else revision
        files = repo.commits.get(commit or "")
        if files is None or commit is None:
            return _error(404, "Invalid rev id: " + revision, "RevisionNotFound")
        data = files.get(filename)
        if data is None:
            reply = _error(404, "Entry not found", "EntryNotFound")
            reply.headers.append(("X-Repo-Commit", commit))
            return reply
        sha = hashlib.sha256(data).hexdigest()
        hub = [
            ("X-Repo-Commit", commit),
            ("X-Linked-Etag", f'"{sha}"'),
            ("X-Linked-Size", str(len(data))),
        ]
        if self.hub_redirect:
            location = f"{self.cdn_base}/cdn/{sha}"
            text = f"Found. Redirecting to {location}".encode()
            return _Reply(
                302,
                [*hub, ("ETag", f'"{lfs_pointer_oid(sha, len(data))}"'), ("Location", location)],
                text,
                0,
                len(text),
            )
        return _ranged(data, headers, f'"{sha}"', hub)

    def _api_model(self, rest: str) -> _Reply:
        repo_id, _, revision = rest.partition("/revision/")
        repo, err = self._find(repo_id)
        if err is not None:
            return err
        assert repo is not None
        commit = repo.main if revision in ("", "main") else revision
        files = repo.commits.get(commit or "")
        if files is None:
            return _error(404, "Invalid rev id: " + revision, "RevisionNotFound")
        info = {
            "id": repo_id,
            "modelId": repo_id,
            "sha": commit,
            "private": False,
            "gated": False,
            "siblings": [{"rfilename": name} for name in sorted(files)],
        }
        text = json.dumps(info).encode()
        return _Reply(200, [("Content-Type", "application/json")], text, 0, len(text))

    def _account(self, path: str, client: str, n: int) -> None:
        with self.lock:
            self.served_bytes += n
            self.served_by_path[path] = self.served_by_path.get(path, 0) + n
            self.served_by_client[client] = self.served_by_client.get(client, 0) + n


def _error(status: int, message: str, code: str | None = None) -> _Reply:
    text = (message + "\n").encode()
    headers = [("Content-Type", "text/plain"), ("X-Error-Message", message)]
    if code is not None:
        headers.append(("X-Error-Code", code))
    return _Reply(status, headers, text, 0, len(text))


def _etag_matches(header: str, etag: str) -> bool:
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def _ranged(
    data: bytes, headers: Mapping[str, str], etag: str, extra: list[tuple[str, str]]
) -> _Reply:
    """A file answer: 200, 206 for a satisfiable single range, 412/304/416 as HTTP says."""
    size = len(data)
    base = [*extra, ("ETag", etag), ("Accept-Ranges", "bytes")]
    if (match := headers.get("If-Match")) is not None and not _etag_matches(match, etag):
        reply = _error(412, "precondition failed")
        reply.headers.append(("ETag", etag))
        return reply
    if (none_match := headers.get("If-None-Match")) is not None and _etag_matches(none_match, etag):
        return _Reply(304, base)
    rng = headers.get("Range")
    if rng is not None and (if_range := headers.get("If-Range")) is not None and if_range != etag:
        rng = None  # the client's copy is stale: the whole file
    if rng is not None:
        spec = rng.strip()
        if spec.startswith("bytes=") and "," not in spec:
            first, _, last = spec.removeprefix("bytes=").partition("-")
            try:
                if first:
                    start, end = int(first), int(last) if last else size - 1
                else:
                    start, end = max(0, size - int(last)), size - 1
            except ValueError:
                start, end = 0, -1
            else:
                end = min(end, size - 1)
                if start <= end and start < size:
                    content_range = f"bytes {start}-{end}/{size}"
                    headers = [*base, ("Content-Range", content_range)]
                    return _Reply(206, headers, data, start, end + 1, is_file=True)
                return _Reply(416, [*base, ("Content-Range", f"bytes */{size}")])
    return _Reply(200, base, data, 0, size, is_file=True)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, owner: FileServer, cdn: bool) -> None:
        self.owner = owner
        self.cdn = cdn
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address) -> None:
        with self.conns_lock:
            self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self.conns_lock:
            self.conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.conns_lock:
            conns = list(self.conns)
        for conn in conns:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    timeout = 30  # idle keep-alive connections end on their own

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._answer("GET")

    def do_HEAD(self) -> None:
        self._answer("HEAD")

    def _answer(self, method: str) -> None:
        owner = self.server.owner
        path = unquote(urlsplit(self.path).path)
        with owner.lock:
            owner.requests.append((method, path, self.headers.get("Range") or ""))
        if owner.only_clients is not None and \
                (self.headers.get(CLIENT_HEADER) or "anon") not in owner.only_clients:
            self.close_connection = True
            return
        while owner.stall and not owner._stop.is_set():
            owner._stop.wait(0.05)
        if owner._stop.is_set():
            self.close_connection = True
            return
        reply = owner._reply(method, path, self.headers, self.server.cdn)
        body_len = reply.end - reply.start
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(body_len))
        self.end_headers()
        if method == "HEAD" or body_len == 0:
            return
        limit, flip = body_len, -1
        with owner.lock:
            cut = owner.cut_after
            if reply.is_file and cut is not None and owner.cuts > 0 and cut < body_len:
                limit = cut
                owner.cuts -= 1
            if reply.is_file and owner.corrupt:
                flip = len(reply.data) // 2
        client = self.headers.get(CLIENT_HEADER) or "anon"
        pos, stop = reply.start, reply.start + limit
        try:
            while pos < stop and not owner._stop.is_set():
                chunk = reply.data[pos : min(stop, pos + _CHUNK)]
                if pos <= flip < pos + len(chunk):
                    mutable = bytearray(chunk)
                    mutable[flip - pos] ^= 0xFF
                    chunk = bytes(mutable)
                self.wfile.write(chunk)
                if reply.is_file:
                    owner._account(path, client, len(chunk))
                pos += len(chunk)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            return
        if pos < reply.end:  # cut (or closing): end the connection mid-body
            self.close_connection = True
            with suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)


@contextmanager
def serve(files: Mapping[str, bytes] | None = None, **knobs: object) -> Iterator[FileServer]:
    """`with serve({"a.gguf": data}, cut_after=1000) as server:` ... closed on exit."""
    server = FileServer(files)
    for name, value in knobs.items():
        if not hasattr(server, name):
            raise TypeError(f"unknown knob {name!r}")
        setattr(server, name, value)
    with server:
        yield server
