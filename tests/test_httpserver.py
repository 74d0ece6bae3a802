"""The loopback test server of testkit/httpserver.py, and what huggingface_hub (2.4) does against
it: plain Range/ETag answers, and `hf_hub_download`/`get_hf_file_metadata` through its hub
emulation, with cuts, corruption, errors and a stalled endpoint.

In-process, huggingface_hub is pointed at the server with `endpoint=` (`hf_hub_download`,
`hf_hub_url`): HF_ENDPOINT is read once, when `huggingface_hub.constants` is imported. A new
process can be given HF_ENDPOINT instead (test_hf_endpoint_env_in_a_new_process)."""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import httpx2
import pytest
from huggingface_hub import (
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    set_client_factory,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

from testkit.httpserver import FileServer, plain_etag, serve
from testkit.waiting import wait_until

REPO = "orch-test/tiny"
FILE = "tiny-q8_0.gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
BLOB = random.Random(7).randbytes(3_000_000)
SHA = hashlib.sha256(BLOB).hexdigest()
SMALL = bytes(range(256)) * 40  # 10240 bytes


@pytest.fixture(autouse=True)
def _online_but_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    # conftest.py makes the whole session offline (HF_HUB_OFFLINE=1); these tests talk to
    # their own server on loopback only.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # build_hf_headers would otherwise GET {constants.ENDPOINT}/api/agent-harnesses (the real
    # hub, not `endpoint=`) once per process, to put an "agent/..." in the User-Agent.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)


@pytest.fixture
def server():
    with serve({"tiny.gguf": SMALL}) as srv:
        srv.add_hub_file(REPO, FILE, BLOB, revision=COMMIT)
        yield srv


def _download(srv: FileServer, cache: Path, **kwargs: object) -> str:
    kwargs.setdefault("revision", COMMIT)
    kwargs.setdefault("endpoint", srv.hub_endpoint)
    return hf_hub_download(REPO, FILE, cache_dir=cache, token=False, **kwargs)


def _request(
    srv: FileServer, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


# -- plain URLs ------------------------------------------------------------------------------


def test_plain_full_get_and_head(server: FileServer) -> None:
    assert server.url("tiny.gguf") == f"{server.base}/tiny.gguf"
    status, headers, body = _request(server, "/tiny.gguf")
    assert (status, body) == (200, SMALL)
    assert headers["Content-Length"] == str(len(SMALL))
    assert headers["ETag"] == plain_etag(SMALL) == f'"{hashlib.sha256(SMALL).hexdigest()[:16]}"'
    assert headers["Accept-Ranges"] == "bytes"
    assert "Content-Range" not in headers
    status, headers, body = _request(server, "/tiny.gguf", method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", str(len(SMALL)))
    assert server.served_bytes == len(SMALL)  # HEAD sends no body
    assert _request(server, "/nope.gguf")[0] == 404


def test_plain_ranges(server: FileServer) -> None:
    n = len(SMALL)
    status, headers, body = _request(server, "/tiny.gguf", {"Range": "bytes=100-"})
    assert (status, body) == (206, SMALL[100:])
    assert headers["Content-Range"] == f"bytes 100-{n - 1}/{n}"
    assert headers["Content-Length"] == str(n - 100)
    status, headers, body = _request(server, "/tiny.gguf", {"Range": "bytes=10-19"})
    assert (status, body, headers["Content-Range"]) == (206, SMALL[10:20], f"bytes 10-19/{n}")
    status, headers, body = _request(server, "/tiny.gguf", {"Range": "bytes=-5"})
    assert (status, body, headers["Content-Range"]) == (
        206,
        SMALL[-5:],
        f"bytes {n - 5}-{n - 1}/{n}",
    )
    status, headers, _ = _request(server, "/tiny.gguf", {"Range": f"bytes={n}-"})
    assert (status, headers["Content-Range"]) == (416, f"bytes */{n}")
    assert [r[2] for r in server.requests] == [
        "bytes=100-",
        "bytes=10-19",
        "bytes=-5",
        f"bytes={n}-",
    ]


def test_plain_conditionals(server: FileServer) -> None:
    etag = plain_etag(SMALL)
    assert _request(server, "/tiny.gguf", {"If-Match": '"stale"'})[0] == 412
    assert server.served_bytes == 0
    assert _request(server, "/tiny.gguf", {"If-Match": etag})[0] == 200
    stale = {"Range": "bytes=100-", "If-Range": '"stale"'}
    assert _request(server, "/tiny.gguf", stale)[:3:2] == (200, SMALL)  # stale copy: all of it
    fresh = {"Range": "bytes=100-", "If-Range": etag}
    assert _request(server, "/tiny.gguf", fresh)[:3:2] == (206, SMALL[100:])
    assert _request(server, "/tiny.gguf", {"If-None-Match": etag})[:3:2] == (304, b"")


def test_byte_accounting_per_client(server: FileServer) -> None:
    _request(server, "/tiny.gguf", {"X-Orch-Client": "w1"})
    _request(server, "/tiny.gguf", {"X-Orch-Client": "w2", "Range": "bytes=0-99"})
    _request(server, "/tiny.gguf")
    _request(server, "/nope.gguf", {"X-Orch-Client": "w2"})  # 404 text is not file bytes
    n = len(SMALL)
    assert server.served_by_client == {"w1": n, "w2": 100, "anon": n}
    assert server.served_by_path == {"/tiny.gguf": 2 * n + 100}
    assert server.served_bytes == 2 * n + 100
    assert server.requests == [
        ("GET", "/tiny.gguf", ""),
        ("GET", "/tiny.gguf", "bytes=0-99"),
        ("GET", "/tiny.gguf", ""),
        ("GET", "/nope.gguf", ""),
    ]
    server.reset_counters()
    assert (server.served_bytes, server.requests, server.served_by_client) == (0, [], {})


def test_plain_cut_corrupt_and_fail(server: FileServer) -> None:
    server.cut_after, server.cuts = 1000, 1
    with pytest.raises(http.client.IncompleteRead):
        _request(server, "/tiny.gguf")
    assert (server.cuts, server.served_bytes) == (0, 1000)
    assert _request(server, "/tiny.gguf")[2] == SMALL  # the cut is spent
    server.corrupt = True
    body = _request(server, "/tiny.gguf")[2]
    assert [i for i in range(len(SMALL)) if body[i] != SMALL[i]] == [len(SMALL) // 2]
    assert _request(server, "/tiny.gguf", {"Range": "bytes=0-99"})[2] == SMALL[:100]
    server.corrupt = False
    server.fail_status = 503
    assert _request(server, "/tiny.gguf")[0] == 503
    assert _request(server, f"/{REPO}/resolve/main/{FILE}", method="HEAD")[0] == 503


def test_stall_times_out_clients_and_close_is_quick() -> None:
    srv = FileServer({"a": b"x"}).start()
    srv.stall = True
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=0.3)
    conn.request("GET", "/a")
    with pytest.raises(TimeoutError):
        conn.getresponse()
    assert srv.requests == [("GET", "/a", "")]  # accepted and read, never answered
    started = time.monotonic()
    srv.close()
    assert time.monotonic() - started < 2
    conn.close()


# -- the hub emulation ---------------------------------------------------------------------


def test_hub_download_then_cache(server: FileServer, tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    assert try_to_load_from_cache(REPO, FILE, cache_dir=cache, revision="main") is None
    path = _download(server, cache, revision="main", headers={"X-Orch-Client": "w1"})
    assert Path(path).read_bytes() == BLOB
    assert Path(path) == cache / "models--orch-test--tiny" / "snapshots" / COMMIT / FILE
    assert Path(path).resolve() == cache / "models--orch-test--tiny" / "blobs" / SHA
    assert server.requests == [
        ("HEAD", f"/{REPO}/resolve/main/{FILE}", ""),
        ("GET", f"/cdn/{SHA}", ""),  # the redirect's Location, on the CDN port
    ]
    assert server.served_by_client == {"w1": len(BLOB)}  # `headers=` go to the CDN too
    assert server.served_by_path == {f"/cdn/{SHA}": len(BLOB)}

    server.reset_counters()
    assert _download(server, cache) == path  # a commit already cached: no request at all
    assert server.requests == []
    assert _download(server, cache, revision="main") == path  # "main": one HEAD, no bytes
    assert server.requests == [("HEAD", f"/{REPO}/resolve/main/{FILE}", "")]
    assert server.served_bytes == 0
    # Without network: the cache alone.
    assert try_to_load_from_cache(REPO, FILE, cache_dir=cache, revision="main") == path
    assert try_to_load_from_cache(REPO, FILE, cache_dir=cache, revision=COMMIT) == path
    assert _download(server, cache, revision="main", local_files_only=True) == path
    assert len(server.requests) == 1
    assert not list(cache.rglob("*.incomplete"))


def test_hub_metadata_without_download(server: FileServer, tmp_path: Path) -> None:
    url = hf_hub_url(REPO, FILE, revision="main", endpoint=server.hub_endpoint)
    assert url == server.hub_url(REPO, FILE)
    meta = get_hf_file_metadata(url, token=False, timeout=5)
    assert (meta.commit_hash, meta.etag, meta.size) == (COMMIT, SHA, len(BLOB))
    assert meta.location == server.cdn_url(BLOB)  # not followed: another origin
    dry = _download(server, tmp_path / "hf", revision="main", dry_run=True)
    assert (dry.commit_hash, dry.file_size, dry.is_cached, dry.will_download) == (
        COMMIT,
        len(BLOB),
        False,
        True,
    )
    assert server.served_bytes == 0
    assert all(method == "HEAD" for method, _, _ in server.requests)


def test_hub_without_redirect(server: FileServer, tmp_path: Path) -> None:
    server.hub_redirect = False
    meta = get_hf_file_metadata(server.hub_url(REPO, FILE, COMMIT), token=False, timeout=5)
    assert (meta.commit_hash, meta.etag, meta.location) == (
        COMMIT,
        SHA,
        server.hub_url(REPO, FILE, COMMIT),
    )
    assert Path(_download(server, tmp_path / "hf")).read_bytes() == BLOB
    assert server.served_by_path == {f"/{REPO}/resolve/{COMMIT}/{FILE}": len(BLOB)}


def test_hub_resumes_within_one_call_after_a_cut(server: FileServer, tmp_path: Path) -> None:
    """One cut: the same call retries (after 1 s) and ends with the right bytes. The partial
    body is lost here: http_get writes only whole DOWNLOAD_CHUNK_SIZE (10 MiB) chunks, so a cut
    before the first 10 MiB restarts from 0 without a Range."""
    server.cut_after, server.cuts = 1_000_000, 1
    assert Path(_download(server, tmp_path / "hf")).read_bytes() == BLOB
    assert server.requests_for(f"/cdn/{SHA}") == [("GET", f"/cdn/{SHA}", "")] * 2
    assert server.served_bytes == 1_000_000 + len(BLOB)
    assert not list((tmp_path / "hf").rglob("*.incomplete"))


class _Progress:
    """A progress callback through `tqdm_class=`: any class taking tqdm's keyword arguments
    (total, initial, desc, unit, unit_scale), usable as a context manager, with update(n)."""

    made: ClassVar[list[_Progress]] = []

    def __init__(self, **kwargs: object) -> None:
        self.kwargs = kwargs
        self.done = 0
        _Progress.made.append(self)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int) -> None:
        self.done += n


def test_hub_resume_uses_range_from_the_last_written_chunk(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256 * 1024)
    server.cut_after, server.cuts = 1_000_000, 1
    _Progress.made.clear()
    path = _download(server, tmp_path / "hf", tqdm_class=_Progress)
    assert Path(path).read_bytes() == BLOB
    resumed_at = 3 * 256 * 1024  # the chunks written before the cut
    assert [r[2] for r in server.requests_for(f"/cdn/{SHA}")] == ["", f"bytes={resumed_at}-"]
    assert server.served_bytes == 1_000_000 + len(BLOB) - resumed_at
    [bar] = _Progress.made  # one bar, kept across the retry
    assert (bar.kwargs["total"], bar.kwargs["initial"], bar.done) == (len(BLOB), 0, len(BLOB))


def test_hub_does_not_check_the_sha256(server: FileServer, tmp_path: Path) -> None:
    """Corrupt bytes are cached under blobs/<sha256> as if good: callers must verify."""
    server.corrupt = True
    path = Path(_download(server, tmp_path / "hf"))
    assert path.resolve().name == SHA
    assert hashlib.sha256(path.read_bytes()).hexdigest() != SHA


def test_hub_not_found_and_gated(server: FileServer, tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("orch-test/none", FILE, cache_dir=cache, endpoint=server.base, token=False)
    with pytest.raises(RemoteEntryNotFoundError) as info:
        hf_hub_download(REPO, "none.gguf", cache_dir=cache, endpoint=server.base, token=False)
    assert isinstance(info.value, EntryNotFoundError)
    with pytest.raises(RevisionNotFoundError):
        _download(server, cache, revision="f" * 40)
    with pytest.raises(RepositoryNotFoundError):
        get_hf_file_metadata(server.hub_url("orch-test/none", FILE), token=False, timeout=5)
    with pytest.raises(LocalEntryNotFoundError):  # offline, nothing cached
        _download(server, cache, local_files_only=True)
    server.gated.add(REPO)
    with pytest.raises(GatedRepoError):  # a subclass of RepositoryNotFoundError
        _download(server, cache)
    assert server.served_bytes == 0


def test_hf_endpoint_env_in_a_new_process(server: FileServer, tmp_path: Path) -> None:
    code = (
        "import sys, huggingface_hub as h\n"
        "p = h.hf_hub_download(sys.argv[1], sys.argv[2], revision=sys.argv[3], token=False)\n"
        "print(p)\n"
    )
    env = dict(
        os.environ,
        HF_ENDPOINT=server.hub_endpoint,
        HF_HOME=str(tmp_path / "home"),
        HF_HUB_CACHE=str(tmp_path / "hf"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="0",
    )
    for name in ("DO_NOT_TRACK", "DISABLE_TELEMETRY", "HF_HUB_OFFLINE", "HF_HUB_ETAG_TIMEOUT"):
        env.pop(name, None)
    out = subprocess.run(
        [sys.executable, "-c", code, REPO, FILE, COMMIT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert Path(out.stdout.strip()).read_bytes() == BLOB
    # Telemetry on: the User-Agent's agent detection asked the emulated hub first.
    assert server.requests[0] == ("GET", "/api/agent-harnesses", "")


# -- a dead endpoint -------------------------------------------------------------------------


def test_stalled_hub_metadata_probe_fails_fast(server: FileServer) -> None:
    """get_hf_file_metadata makes one attempt (retry_on_errors=False) bounded by `timeout`."""
    server.stall = True
    started = time.monotonic()
    with pytest.raises(httpx2.TimeoutException):
        get_hf_file_metadata(server.hub_url(REPO, FILE), token=False, timeout=1)
    assert time.monotonic() - started < 5


def test_stalled_hub_falls_back_to_the_cache(server: FileServer, tmp_path: Path) -> None:
    path = _download(server, tmp_path / "hf", revision="main")
    server.stall = True
    started = time.monotonic()
    assert _download(server, tmp_path / "hf", revision="main", etag_timeout=1) == path
    assert time.monotonic() - started < 5


class HubUnreachable(ConnectionError):
    """Raised by _FailFast: no huggingface_hub layer catches or retries it."""


class _FailFast(httpx2.BaseTransport):
    """Caps every timeout at `cap` seconds and turns connect errors and timeouts (while
    connecting or awaiting the headers) into HubUnreachable."""

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.inner = httpx2.HTTPTransport()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        timeouts = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            k: self.cap if v is None else min(v, self.cap) for k, v in timeouts.items()
        } or dict.fromkeys(("connect", "read", "write", "pool"), self.cap)
        try:
            return self.inner.handle_request(request)
        except (httpx2.ConnectError, httpx2.TimeoutException) as exc:
            raise HubUnreachable(f"{request.method} {request.url}: {exc!r}") from exc

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def fail_fast_client():
    set_client_factory(
        lambda: httpx2.Client(
            transport=_FailFast(1.0),
            event_hooks={"request": [hf_request_event_hook]},
            follow_redirects=True,
            timeout=None,
        )
    )
    yield
    set_client_factory(default_client_factory)


def test_stalled_hub_download_fails_fast_with_a_fail_fast_client(
    server: FileServer, tmp_path: Path, fail_fast_client: None
) -> None:
    """etag_timeout alone is not enough (see the next test): after a first timeout with nothing
    cached, hf_hub_download retries the HEAD up to 6 times with a 60 s timeout and 23 s of
    backoff. An exception none of its layers knows ends it at once."""
    server.stall = True
    started = time.monotonic()
    with pytest.raises(HubUnreachable):
        _download(server, tmp_path / "hf", revision="main", etag_timeout=1)
    assert time.monotonic() - started < 10
    server.stall = False
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    started = time.monotonic()
    with pytest.raises(HubUnreachable):  # refused: also no 23 s of retries
        _download(server, tmp_path / "hf", endpoint=f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 5


def test_stalled_hub_download_retries_despite_etag_timeout(
    server: FileServer, tmp_path: Path
) -> None:
    """The trap, shown in a process of its own (killed once the second HEAD arrives)."""
    server.stall = True
    code = (
        "import sys, huggingface_hub as h\n"
        "h.hf_hub_download(sys.argv[1], sys.argv[2], token=False, etag_timeout=1)\n"
    )
    env = dict(
        os.environ,
        HF_ENDPOINT=server.hub_endpoint,
        HF_HOME=str(tmp_path / "home"),
        HF_HUB_CACHE=str(tmp_path / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_ETAG_TIMEOUT="1",
        HF_HUB_OFFLINE="0",
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, REPO, FILE],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: len(server.requests) >= 2, 15, "the client's second HEAD request")
        assert server.requests == [("HEAD", f"/{REPO}/resolve/main/{FILE}", "")] * 2
        assert proc.poll() is None  # still waiting on the retry, 60 s timeout
    finally:
        proc.kill()
        proc.wait()
