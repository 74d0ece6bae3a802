"""HTTPS for orch serve: a self-signed certificate made once and kept, served by the real
app and pinned by its fingerprint; the command's TLS flags and its warning about serving
beyond loopback in the clear."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from fastapi import FastAPI

from orchestrator.serve.guard import ApiKeyGuard
from orchestrator.serve.tls import tls_files
from testkit.serving import running


def test_a_self_signed_certificate_is_made_once_and_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path))
    first = tls_files("self-signed", None, None)
    assert first is not None and first.fingerprint
    assert stat.S_IMODE(first.key.stat().st_mode) == 0o600, "the key is readable by others"
    assert first.key.is_relative_to(tmp_path)
    assert tls_files("self-signed", None, None) == first, "a second start made a new one"


def test_https_with_the_pinned_certificate(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path))
    files = tls_files("self-signed", None, None)
    app = FastAPI()
    app.add_middleware(ApiKeyGuard, key="k")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"data": []}

    with running(app, scheme="https", ssl_certfile=str(files.cert),
                 ssl_keyfile=str(files.key)) as base:
        port = int(base.rsplit(":", 1)[1])
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # pinned below
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                context.wrap_socket(raw) as tls:
            presented = hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()
        assert presented == files.fingerprint
        request = urllib.request.Request(f"{base}/v1/models",
                                         headers={"Authorization": "bearer k"})
        with urllib.request.urlopen(request, context=context, timeout=10) as reply:
            assert reply.status == 200


def orch_serve(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "serve", "x.gguf", *args],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, ORCH_CACHE_DIR=str(cache)))


@pytest.mark.parametrize(("args", "message"), [
    (("--tls-cert", "cert.pem"), "give both --tls-cert and --tls-key"),
    (("--tls", "self-signed", "--tls-key", "k.pem"), "leave out"),
    (("--tls", "letsencrypt"), "self-signed"),
])
def test_tls_flags_that_do_not_fit_are_refused(tmp_path, args, message) -> None:
    done = orch_serve(*args, cache=tmp_path)
    assert done.returncode != 0 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_serving_beyond_loopback_in_the_clear_warns(tmp_path) -> None:
    with socket.socket() as taken:  # the busy port stops the command right after the notes
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        done = orch_serve("--host", "0.0.0.0", "--port", str(taken.getsockname()[1]),
                          cache=tmp_path)
    assert done.returncode == 1
    assert "plain HTTP" in done.stderr and "without an API key" in done.stderr, done.stderr
