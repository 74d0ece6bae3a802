"""`orch pull URL` against a real HTTP server on loopback: resumed after the server cuts
the connection, corrupted bytes refused, two pulls at once, a full disk refused before a
byte is written, and `orch run URL` answering like the file on disk."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from orchcore import modelgen
from orchcore.errors import ModelFetchError
from orchestrator.models.download import pull_url, pulled_files, remove_pulled
from testkit.models import generated_model


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.cut_after: int | None = None  # close responses after this many bytes ...
        self.cuts = 0  # ... this many times
        self.corrupt = False
        self.lie_length: int | None = None
        self.served = 0
        self.requests: list[str] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        server: _Server = self.server
        data = server.files.get(self.path.lstrip("/"))
        server.requests.append(self.headers.get("Range") or "")
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
        body = data[start:]
        if server.corrupt:
            body = bytes(b ^ 0xFF if i == len(body) // 2 else b for i, b in enumerate(body))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(server.lie_length or len(body)))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        if server.cut_after is not None and server.cuts:
            body = body[:server.cut_after]
            server.cuts -= 1
            self.close_connection = True
        self.wfile.write(body)
        server.served += len(body)


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return generated_model(modelgen.preset("tiny-llama-gqa"), "tiny.gguf").read_bytes()


@pytest.fixture
def server(model_bytes):
    srv = _Server({"tiny.gguf": model_bytes, "junk.gguf": b"not a model" * 100})
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()


def test_a_cut_connection_resumes_and_the_file_is_verified(server, model_bytes, tmp_path):
    server.cut_after, server.cuts = len(model_bytes) // 4, 3  # cut three times in a row
    got = pull_url(f"{server.base}/tiny.gguf", root=tmp_path, progress=False)
    assert got.path.read_bytes() == model_bytes
    assert got.sha256 == hashlib.sha256(model_bytes).hexdigest()
    assert server.requests[1] == f"bytes={len(model_bytes) // 4}-"  # resumed, not restarted
    assert server.served == len(model_bytes)
    again = pull_url(f"{server.base}/tiny.gguf", root=tmp_path, progress=False)
    assert again == got and len(server.requests) == 4  # cached: nothing fetched
    assert [p.path for p in pulled_files(tmp_path)] == [got.path]
    assert remove_pulled("tiny.gguf", tmp_path) == [got.path] and not got.path.exists()


def test_corrupted_bytes_or_not_a_model_are_refused_and_nothing_is_kept(server, model_bytes,
                                                                        tmp_path):
    server.corrupt = True
    want = hashlib.sha256(model_bytes).hexdigest()
    with pytest.raises(ModelFetchError, match="not the expected"):
        pull_url(f"{server.base}/tiny.gguf", sha256=want, root=tmp_path, progress=False)
    with pytest.raises(ModelFetchError, match="not a GGUF file"):
        pull_url(f"{server.base}/junk.gguf", root=tmp_path, progress=False)
    with pytest.raises(ModelFetchError, match="404"):
        pull_url(f"{server.base}/missing.gguf", root=tmp_path, progress=False)
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".gguf", ".part")]


def test_two_pulls_at_once_share_one_download(server, model_bytes, tmp_path):
    results = []
    pulls = [threading.Thread(target=lambda: results.append(pull_url(
        f"{server.base}/tiny.gguf", root=tmp_path, progress=False))) for _ in range(2)]
    for t in pulls:
        t.start()
    for t in pulls:
        t.join(60)
    assert len(results) == 2 and results[0] == results[1]
    assert server.served == len(model_bytes)


def test_a_full_disk_is_refused_before_anything_is_written(server, tmp_path):
    server.lie_length = 1 << 50  # a petabyte: no disk has room
    with pytest.raises(ModelFetchError, match=r"needs \d+ MiB more on .* MiB free"):
        pull_url(f"{server.base}/tiny.gguf", root=tmp_path, progress=False)
    assert not [p for p in tmp_path.rglob("*") if p.suffix == ".gguf"]


def test_run_a_url_answers_like_the_file(server, smollm2_path, tmp_path):
    server.files["smollm2.gguf"] = Path(smollm2_path).read_bytes()
    env = dict(os.environ, ORCH_CACHE_DIR=str(tmp_path))
    args = ["The capital of France is", "--no-chat", "--max-tokens", "4", "--local", "2"]
    by_url = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run",
                             f"{server.base}/smollm2.gguf", *args], env=env,
                            capture_output=True, text=True, timeout=300)
    by_file = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run",
                              str(smollm2_path), *args], env=env, capture_output=True,
                             text=True, timeout=300)
    assert by_url.returncode == 0, by_url.stderr
    assert by_url.stdout == by_file.stdout and "Paris" in by_url.stdout
