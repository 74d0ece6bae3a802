"""`orch pull URL` against the real HTTP server of testkit/httpserver.py on loopback: resumed
after the server cuts the connection, pinned to one version, 5xx retried and 4xx refused,
corrupted bytes refused, two pulls at once, a file cut short (or with bytes after its last
tensor) never counted, a full disk refused in one line before a byte is written, and
`orch run URL` answering like the file on disk."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from orchcore import modelgen
from orchcore.errors import ModelFetchError, SourceFetchError
from orchestrator.models.download import find_pulled, pull_url, pulled_files, remove_pulled
from testkit.httpserver import FileServer, serve
from testkit.models import generated_model


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return generated_model(modelgen.preset("tiny-llama-gqa"), "tiny.gguf").read_bytes()


@pytest.fixture
def server(model_bytes):
    with serve({"tiny.gguf": model_bytes, "junk.gguf": b"not a model" * 100}) as srv:
        yield srv


def gets(server: FileServer, name: str) -> list[str]:
    """The Range header of every GET of ``name``."""
    return [r for method, _, r in server.requests_for(f"/{name}") if method == "GET"]


def left_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def orch(*args: str, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


def test_a_cut_connection_resumes_and_the_file_is_verified(server, model_bytes, tmp_path):
    size = len(model_bytes)
    server.cut_after, server.cuts = size // 4, 3  # cut three times in a row
    got = pull_url(server.url("tiny.gguf"), root=tmp_path, progress=False)
    assert got.path.read_bytes() == model_bytes
    assert got.sha256 == hashlib.sha256(model_bytes).hexdigest()
    assert gets(server, "tiny.gguf")[:2] == ["bytes=0-", f"bytes={size // 4}-{size - 1}"], \
        "a cut pull must resume where it stopped, not start over"
    assert server.served_bytes == size
    again = pull_url(server.url("tiny.gguf"), root=tmp_path, progress=False)
    assert again == got and len(gets(server, "tiny.gguf")) == 4  # cached: nothing fetched
    assert [p.path for p in pulled_files(tmp_path)] == [got.path]
    assert left_in(tmp_path) == [f"{got.path.parent.name}/tiny.gguf",
                                 f"{got.path.parent.name}/tiny.gguf.json"]  # no lock, no part
    assert remove_pulled("tiny.gguf", tmp_path) == [got.path] and not got.path.exists()


def test_a_part_resumes_only_while_the_file_is_the_same_version(model_bytes, tmp_path):
    half = len(model_bytes) // 2
    changed = model_bytes[:-1] + bytes([model_bytes[-1] ^ 1])
    for root, new in ((tmp_path / "same", model_bytes), (tmp_path / "changed", changed)):
        # Cut half way, then the server fails: the pull gives up and keeps its part.
        with serve({"tiny.gguf": model_bytes}, cut_after=half, cuts=1, fail_status=503,
                   fail_after=1) as server:
            with pytest.raises(SourceFetchError, match="MiB are kept: the same command"):
                pull_url(server.url("tiny.gguf"), root=root, progress=False)
            assert find_pulled(server.url("tiny.gguf"), root) is None
            server.add_file("tiny.gguf", new)
            server.fail_status = None
            server.reset_counters()
            got = pull_url(server.url("tiny.gguf"), root=root, progress=False)
            ranges = gets(server, "tiny.gguf")
        assert got.path.read_bytes() == new
        if new is model_bytes:
            assert ranges == [f"bytes={half}-{len(model_bytes) - 1}"], "not resumed"
        else:  # the part is of the old version (If-Match: 412): started over
            assert ranges == [f"bytes={half}-{len(model_bytes) - 1}", "bytes=0-"], ranges


def test_5xx_is_retried_and_4xx_refused_at_once(server, model_bytes, tmp_path):
    server.fail_status, server.fail_times = 503, 2
    got = pull_url(server.url("tiny.gguf"), root=tmp_path, progress=False)
    assert got.path.read_bytes() == model_bytes
    assert len(gets(server, "tiny.gguf")) == 3
    server.reset_counters()
    server.fail_status, server.fail_times = 403, None
    with pytest.raises(SourceFetchError, match="the server answered 403"):
        pull_url(server.url("tiny.gguf"), root=tmp_path / "b", progress=False)
    assert len(gets(server, "tiny.gguf")) == 1, "a 4xx must not be retried"
    server.fail_status = 500
    with pytest.raises(SourceFetchError, match=r"cannot fetch .*500"):
        pull_url(server.url("tiny.gguf"), root=tmp_path / "c", progress=False)
    assert left_in(tmp_path / "b") == [] and left_in(tmp_path / "c") == [], \
        "a failed pull must leave nothing behind"


def test_corrupted_bytes_or_not_a_model_are_refused_and_nothing_is_kept(server, model_bytes,
                                                                        tmp_path):
    server.corrupt = True
    want = hashlib.sha256(model_bytes).hexdigest()
    with pytest.raises(ModelFetchError, match="not the expected"):
        pull_url(server.url("tiny.gguf"), sha256=want, root=tmp_path, progress=False)
    with pytest.raises(ModelFetchError, match="not a GGUF file"):
        pull_url(server.url("junk.gguf"), root=tmp_path, progress=False)
    with pytest.raises(ModelFetchError, match="404"):
        pull_url(server.url("missing.gguf"), root=tmp_path, progress=False)
    assert left_in(tmp_path) == []


def test_two_pulls_at_once_share_one_download(server, model_bytes, tmp_path):
    results = []
    pulls = [threading.Thread(target=lambda: results.append(pull_url(
        server.url("tiny.gguf"), root=tmp_path, progress=False))) for _ in range(2)]
    for t in pulls:
        t.start()
    for t in pulls:
        t.join(60)
    assert len(results) == 2 and results[0] == results[1]
    assert server.served_bytes == len(model_bytes)


def _more_tensors(data: bytes) -> bytes:
    """``data`` whose header claims one tensor more than its table holds."""
    (n_tensors,) = struct.unpack_from("<Q", data, 8)
    return data[:8] + struct.pack("<Q", n_tensors + 1) + data[16:]


@pytest.mark.parametrize("damage", ["trailing", "more-tensors", "one-byte-short"])
def test_a_file_that_is_not_whole_is_refused(server, model_bytes, tmp_path, damage):
    data = {"trailing": model_bytes + b"\0" * 4096,
            "more-tensors": _more_tensors(model_bytes),
            "one-byte-short": model_bytes[:-1]}[damage]
    server.add_file("bad.gguf", data)
    with pytest.raises(ModelFetchError, match="not a whole model") as info:
        pull_url(server.url("bad.gguf"), root=tmp_path, progress=False)
    assert "nothing was kept" in str(info.value)
    assert left_in(tmp_path) == []
    # ... with the right sha256 registered too: a whole model is more than matching bytes.
    with pytest.raises(ModelFetchError, match="not a whole model"):
        pull_url(server.url("bad.gguf"), sha256=hashlib.sha256(data).hexdigest(),
                 size=len(data), root=tmp_path, progress=False)


def test_a_model_cut_short_on_the_server_is_never_verified(smollm2_path, tmp_path):
    """The first 30 MB of the 98 MB SmolLM2, served whole: `orch pull` refuses it, says why
    in one line, and leaves nothing that counts (no file, record, stamp or lock)."""
    cut = Path(smollm2_path).read_bytes()[:30 << 20]
    env = dict(os.environ, ORCH_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="200")
    with serve({"t.gguf": cut}) as server:
        pulled = orch("pull", server.url("t.gguf"), env=env)
    assert pulled.returncode == 1, pulled.stdout
    *_, last = lines = pulled.stderr.strip().splitlines()
    assert last.startswith("error: ") and "cut short" in last, pulled.stderr
    assert [line for line in lines if "error" in line] == [last], pulled.stderr
    assert left_in(tmp_path / "cache") == []
    listed = orch("list", "--json", env=env)
    assert [r for r in json.loads(listed.stdout) if r["name"] == "t.gguf"] == []


def test_a_pull_recorded_before_the_check_no_longer_counts(server, model_bytes, tmp_path):
    got = pull_url(server.url("tiny.gguf"), root=tmp_path, progress=False)
    with got.path.open("r+b") as fh:  # as an older orch left a cut file, record and all
        fh.truncate(len(model_bytes) // 2)
    record = got.path.with_name("tiny.gguf.json")
    record.write_text(json.dumps(json.loads(record.read_text()) | {"size": len(model_bytes) // 2}))
    assert find_pulled(server.url("tiny.gguf"), tmp_path) is None
    again = pull_url(server.url("tiny.gguf"), root=tmp_path, progress=False)
    assert again.path.read_bytes() == model_bytes


def test_an_empty_target_says_what_to_give(tmp_path):
    env = dict(os.environ, ORCH_CACHE_DIR=str(tmp_path / "cache"))
    done = orch("pull", "", env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("error: no model given: name a known model"), done.stderr
    assert "directory" not in done.stderr


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails, not kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_no_room_is_one_line_before_a_byte_is_written(smollm2_path, tmp_path):
    """Files may not exceed 30 MB (as on a full or small disk): pulling the 98 MB model is
    refused up front, naming the file, what it needs and what there is."""
    env = dict(os.environ, ORCH_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="200")
    with serve({"smollm2.gguf": Path(smollm2_path).read_bytes()}) as server:
        done = orch("pull", server.url("smollm2.gguf"), env=env,
                    preexec_fn=_file_size_limit(30 << 20))
    assert done.returncode == 1
    *_, last = lines = done.stderr.strip().splitlines()
    assert [line for line in lines if "error" in line] == [last], done.stderr
    assert "smollm2.gguf.part needs 94 MiB" in last and "30 MiB at most" in last, last
    assert left_in(tmp_path / "cache") == [], "nothing may be written for a file that cannot be"


def test_run_a_url_answers_like_the_file(server, smollm2_path, tmp_path):
    server.add_file("smollm2.gguf", Path(smollm2_path).read_bytes())
    env = dict(os.environ, ORCH_CACHE_DIR=str(tmp_path))
    args = ["The capital of France is", "--no-chat", "--max-tokens", "4", "--local", "2"]
    by_url = orch("run", server.url("smollm2.gguf"), *args, env=env)
    by_file = orch("run", str(smollm2_path), *args, env=env)
    assert by_url.returncode == 0, by_url.stderr
    assert by_url.stdout == by_file.stdout and "Paris" in by_url.stdout
