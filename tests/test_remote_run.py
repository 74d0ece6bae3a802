"""`orch run` on a model published over HTTP (a plain Range server and the hub emulation on
loopback), with local workers: the orchestrator reads only headers, each worker fetches
only its slice, and the answer is the one the file on disk gives (f32 hidden states).
Workers that cannot reach the source get their shard from the orchestrator, or, with
`--fetch workers`, the run stops and says why."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchcore import modelgen
from orchcore.facts import read_model_facts
from orchcore.shard import LayerRange
from orchcore.slices import shard_ranges, total_bytes
from testkit.httpserver import serve
from testkit.models import generated_model

ARGS = ["The capital of France is", "--no-chat", "--max-tokens", "6", "--temperature", "0"]
_STAGE = re.compile(r"stage \d+: layers \[(\d+), (\d+)\)")


def orch(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def stage_ranges(stderr: str) -> list[LayerRange]:
    return [LayerRange(int(a), int(b)) for a, b in _STAGE.findall(stderr)]


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return dict(os.environ, ORCH_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="200")


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> Path:
    """Untied lm head, and tensors large next to the header (like a real model)."""
    spec = modelgen.preset("tiny-llama-mha-untied", n_layers=8, n_embd=256, n_ff=768)
    return generated_model(spec, "untied.gguf")


@pytest.fixture(scope="module")
def by_file(smollm2_path, tmp_path_factory) -> str:
    env = dict(os.environ, ORCH_CACHE_DIR=str(tmp_path_factory.mktemp("c")))
    done = orch("run", str(smollm2_path), *ARGS, "--local", "3", env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def check_bytes(server, path: Path, stderr: str, name: str) -> dict[str, int]:
    """The orchestrator fetched headers only; the workers exactly their shards' ranges."""
    facts = read_model_facts(path)
    served = dict(server.served_by_client)
    orchestrator = served.pop("orchestrator")
    stages = stage_ranges(stderr)
    assert len(served) == len(stages), (served, stderr)
    expected = sum(total_bytes(shard_ranges(facts, r)) for r in stages)
    assert sum(served.values()) == expected
    # Headers, read in doubling prefixes (under twice their size: Gemma 3's 6.2 MiB took
    # 8 MiB), and for a tied model the prompt's embedding rows.
    assert orchestrator < 2 * facts.data_offset + (1 << 20)
    workers = sum(served.values())
    if facts.tied_output:  # the embedding is fetched once, by the last stage
        assert workers <= 1.10 * facts.file_size, \
            f"{len(stages)} workers fetched {workers / facts.file_size:.3f}x the file"
    else:
        headers = facts.data_offset * len(stages)
        assert workers <= 1.05 * (facts.file_size + headers)
    print(f"{name}: orchestrator {orchestrator} B ({orchestrator / facts.file_size:.1%}), "
          f"workers {sum(served.values())} B ({sum(served.values()) / facts.file_size:.1%})")
    return served


def test_run_by_url_fetches_slices_and_answers_like_the_file(smollm2_path, by_file, env):
    data = Path(smollm2_path).read_bytes()
    with serve({"smollm2.gguf": data}) as server:
        done = orch("run", server.url("smollm2.gguf"), *ARGS, "--local", "3", env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout == by_file and "Paris" in done.stdout
        assert "each worker fetches its own layers" in done.stderr
        check_bytes(server, Path(smollm2_path), done.stderr, "135M")
        assert server.served_by_client["orchestrator"] < 0.03 * len(data)
        before = server.served_bytes
        again = orch("run", server.url("smollm2.gguf"), *ARGS, "--local", "3", env=env)
        assert again.returncode == 0 and again.stdout == by_file
        # Headers and shards are cached: only the size check is fetched again.
        assert server.served_bytes - before <= 16, again.stderr
    assert not list(Path(env["ORCH_CACHE_DIR"]).rglob("*.part"))


@pytest.mark.parametrize(("model", "workers"), [("smollm2", 2), ("gemma3", 2), ("gemma3", 3)])
def test_tied_models_by_url_fetch_at_most_1_10x_the_file(model, workers, request, by_file,
                                                         env):
    """Stage 0 of a tied model fetches no embedding (the last stage holds it as its lm
    head); the orchestrator fetches the prompt's rows by Range for it."""
    path = Path(request.getfixturevalue(f"{model}_path"))
    with serve({"m.gguf": path.read_bytes()}) as server:
        done = orch("run", server.url("m.gguf"), *ARGS, "--local", str(workers), env=env)
        assert done.returncode == 0, done.stderr
        assert len(stage_ranges(done.stderr)) == workers, done.stderr
        check_bytes(server, path, done.stderr, f"{model} over {workers}")
    if model == "smollm2":
        assert done.stdout == by_file  # 3 workers, from the file


def test_run_by_url_untied_model(untied, env):
    expected = orch("run", str(untied), *ARGS, "--local", "3", env=env)
    assert expected.returncode == 0, expected.stderr
    with serve({"untied.gguf": untied.read_bytes()}) as server:
        done = orch("run", server.url("untied.gguf"), *ARGS, "--local", "3", env=env)
        assert done.returncode == 0, done.stderr
        check_bytes(server, untied, done.stderr, "untied")
    assert done.stdout == expected.stdout


def test_workers_that_cannot_reach_the_source(smollm2_path, by_file, env):
    with serve({"smollm2.gguf": Path(smollm2_path).read_bytes()},
               only_clients={"orchestrator"}) as server:
        stopped = orch("run", server.url("smollm2.gguf"), *ARGS, "--local", "3",
                       "--fetch", "workers", env=env)
        assert stopped.returncode == 1
        assert "cannot fetch the model from its source" in stopped.stderr
        assert "Traceback" not in stopped.stderr
        fallback = orch("run", server.url("smollm2.gguf"), *ARGS, "--local", "3", env=env)
        assert fallback.returncode == 0, fallback.stderr
        assert "sends that worker its shard instead" in fallback.stderr
    assert fallback.stdout == by_file


def test_run_a_hub_file(smollm2_path, by_file, env, tmp_path):
    with serve() as server:
        server.add_hub_file("org/smol-GGUF", "smollm2.gguf", Path(smollm2_path).read_bytes())
        hub_env = dict(env, HF_ENDPOINT=server.hub_endpoint, HF_HUB_OFFLINE="0",
                       HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hf"))
        done = orch("run", "hf://org/smol-GGUF/smollm2.gguf", *ARGS, "--local", "2",
                    env=hub_env)
        assert done.returncode == 0, done.stderr
        assert "each worker fetches its own layers" in done.stderr
    assert done.stdout == by_file
