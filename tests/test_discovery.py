"""Discovery on loopback: workers announced with zeroconf are found, only those holding the
cluster token are used (they prove it before the token is sent), a cloned worker id is
replaced, and `orch run` with no worker list uses what it finds."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from rich.console import Console

from orchcore.errors import OrchError
from orchestrator.cli.running import WorkerChoice
from orchestrator.cluster.discover import discover
from orchestrator.cluster.local import LocalCluster
from orchestrator.settings import OrchSettings

TOKEN = "cluster-token-for-discovery"


@pytest.fixture
def on_loopback(monkeypatch):
    monkeypatch.setenv("ORCH_WORKER_DISCOVERY", "lo")


def _settings(token: str | None = TOKEN) -> OrchSettings:
    return OrchSettings.load(discovery="lo", discovery_timeout_s=3.0, token=token)


def test_members_are_found_and_strangers_named(on_loopback, tmp_path):
    with LocalCluster(3, tmp_path / "ours", token=TOKEN) as ours, \
            LocalCluster(1, tmp_path / "theirs", token="another-token") as theirs:
        found = discover(_settings())
        assert sorted(w.address for w in found.members) == sorted(ours.addresses)
        assert [(w.address, why) for w, why in found.others] == \
            [(theirs.addresses[0], "another cluster (a different token)")]
        for worker in found.members:
            assert worker.advert.cores >= 1 and worker.advert.budget_mb > 0
        no_token = discover(_settings(token=None))
        assert not no_token.members
        assert {why for _, why in no_token.others} == {
            "another cluster (it has a token; set ORCH_TOKEN)"}


def test_a_cloned_worker_id_is_replaced(on_loopback, tmp_path):
    with LocalCluster(1, tmp_path / "a", token=TOKEN) as first:
        original = (tmp_path / "a" / "worker-0" / "worker-id").read_text()
        clone_dir = tmp_path / "b" / "worker-0"
        clone_dir.mkdir(parents=True)
        (clone_dir / "worker-id").write_text(original)  # an SD card copied with its state
        with LocalCluster(1, tmp_path / "b", token=TOKEN) as clone:
            renewed = (clone_dir / "worker-id").read_text()
            assert renewed != original
            found = discover(_settings())
            assert sorted(w.advert.worker_id for w in found.members) == \
                sorted([original.strip(), renewed.strip()])
            assert {w.address for w in found.members} == {*first.addresses,
                                                           *clone.addresses}


def test_run_without_a_worker_list_uses_discovered_workers(on_loopback, smollm2_path,
                                                          tmp_path):
    env = dict(os.environ, ORCH_DISCOVERY="lo", ORCH_TOKEN=TOKEN,
               ORCH_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="200")
    with LocalCluster(2, tmp_path / "w", token=TOKEN) as cluster:
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "run", str(smollm2_path),
             "The capital of France is", "--no-chat", "--max-tokens", "4", "--objective",
             "throughput"], env=env, capture_output=True, text=True, timeout=180)
        planned = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "plan", str(smollm2_path), "--json"],
            env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "found 2 workers" in done.stderr
    for address in cluster.addresses:
        assert f"on {address}" in done.stderr
    assert "Paris" in done.stdout
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)  # latency: one worker holds it all, one stands by
    assert {s["worker"] for s in plan["stages"]} | {s["worker"] for s in plan["standby"]} \
        == set(cluster.addresses)


def test_workers_come_from_the_flag_else_discovery(on_loopback, tmp_path):
    """The one rule every command that uses workers follows (run, plan, serve, cluster,
    rotate-token): --workers as listed; --local: none found; neither: those discovered."""
    settings, err = _settings(), Console(file=io.StringIO())
    listed = WorkerChoice.from_flags("127.0.0.1:5,127.0.0.1:6", local=3)
    assert listed.addresses(settings, err) == ("127.0.0.1:5", "127.0.0.1:6")
    assert WorkerChoice.from_flags(None, local=3).addresses(settings, err) is None
    with pytest.raises(OrchError, match="no workers: give --workers"):
        WorkerChoice.from_flags(None).required(settings, err)
    with LocalCluster(1, tmp_path / "w", token=TOKEN) as ours:
        assert WorkerChoice.from_flags(None).required(settings, err) == tuple(ours.addresses)
        assert WorkerChoice.from_flags(None, local=1).addresses(settings, err) is None
    assert "found 1 worker: " in err.file.getvalue()
