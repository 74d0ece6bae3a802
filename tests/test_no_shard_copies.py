"""``orch run`` as a user runs it, over three local workers: the orchestrator keeps no
shard copies (its cache grows by under 1% of the model), a second run sends nothing, the
greedy answer is the unsplit model's, and a worker whose disk is too small is one line.

Local workers keep their shard caches under the orchestrator's cache root (``local/``):
that is the workers' disk, which holds each shard once, and is not counted as the
orchestrator's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchcore import modelgen
from orchestrator.cluster.local import LocalCluster
from testkit.disks import NEEDS_ROOT, can_mount, small_disk
from testkit.reference import ReferenceModel

PROMPT = "The capital of France is"
STEPS = 8


def orch(*args: str, cache: Path, token: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ORCH_CACHE_DIR=str(cache), COLUMNS="200")
    if token:
        env["ORCH_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def orchestrator_disk_use(cache: Path) -> int:
    """Bytes in the orchestrator's cache, without the local workers' own caches."""
    return sum(p.stat().st_size for p in cache.rglob("*")
               if p.is_file() and not p.is_relative_to(cache / "local"))


def one_copy_per_worker(cache: Path) -> None:
    """Each worker's disk holds its shard once: no second copy, no sparse copy left."""
    for worker in sorted((cache / "local").glob("worker-*")):
        shards = list(worker.glob("*.gguf"))
        assert len(shards) == 1, f"{worker.name} holds {shards}"
        assert not list(worker.glob("fetching/*/*")), f"{worker.name} kept a sparse copy"


def greedy_text(model: Path) -> str:
    ref = ReferenceModel(model, threads=1)
    try:
        tokens, _ = ref.greedy(ref.tokenize(PROMPT), STEPS)
        return ref.detokenize(tokens)
    finally:
        ref.close()


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return modelgen.write_model(tmp_path_factory.mktemp("model") / "gen.gguf",
                                modelgen.preset("tiny-llama-mha-untied"))


@pytest.mark.parametrize("which", ["generated", "smollm2"])
def test_two_runs_keep_no_shard_copy_and_the_second_sends_nothing(
        which, generated, smollm2_path, tmp_path):
    model = generated if which == "generated" else smollm2_path
    cache = tmp_path / "cache"
    old = cache / "shards-out" / "old-shard.gguf"  # what an older version left behind
    old.parent.mkdir(parents=True)
    old.write_bytes(bytes(1 << 20))
    args = ("run", str(model), PROMPT, "--no-chat", "--temperature", "0", "--max-tokens",
            str(STEPS), "--local", "3", "--threads", "1")
    first = orch(*args, cache=cache)
    assert first.returncode == 0, first.stderr
    assert "stage 2: " in first.stderr, first.stderr  # three stages, one per worker
    size = model.stat().st_size
    assert orchestrator_disk_use(cache) < size / 100, "the orchestrator kept shard copies"
    one_copy_per_worker(cache)
    assert "deleted the 1 MiB of shard copies" in first.stderr, first.stderr
    assert not old.parent.exists()
    assert "MiB of shards sent" in first.stderr, first.stderr
    again = orch(*args, cache=cache)
    assert again.returncode == 0, again.stderr
    assert "0 bytes of shards sent" in again.stderr, again.stderr
    assert "shard copies" not in again.stderr  # said once
    assert orchestrator_disk_use(cache) < size / 100
    want = greedy_text(model)
    assert first.stdout.strip() == again.stdout.strip() == want.strip(), \
        (first.stdout, again.stdout, want)


@pytest.mark.skipif(not can_mount(), reason=NEEDS_ROOT)
def test_a_worker_whose_disk_is_too_small_is_one_line(smollm2_path, tmp_path):
    with small_disk(tmp_path / "disk", 64) as disk, \
            LocalCluster(1, disk, threads_per_worker=1, log_dir=tmp_path / "logs") as one:
        done = orch("run", str(smollm2_path), "hi", "--max-tokens", "2", "--workers",
                    one.addresses[0], cache=tmp_path / "cache", token=one.token)
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert "Traceback" not in done.stderr, done.stderr
        error = lines[-1]
        assert f"worker {one.addresses[0]}" in error and "needs" in error, done.stderr
        assert "are free" in error and str(disk) in error, done.stderr
        assert not [p for p in disk.rglob("*") if p.suffix in (".gguf", ".part")]
        assert not list(disk.glob("*/fetching/*/*")), "a sparse copy was left"
