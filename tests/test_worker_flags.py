"""`orch worker`'s flags held to the machine it runs on, and `orch worker install` warning
about a program the service could not see."""

from __future__ import annotations

import json
import subprocess

import pytest

from orchcore.cpu import cpu_info, memory_info
from orchcore.memory import MIB, PROCESS_BASELINE_BYTES
from testkit.cluster import worker_once
from worker.install import InstallRequest, install

TOKEN = "a-cluster-token-for-the-flag-tests"


def start_worker(tmp_path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`orch worker` on loopback with ``flags``: refused at once, or served (then stopped)."""
    return worker_once(tmp_path, TOKEN, *flags)


@pytest.mark.parametrize("budget", ["1", "99999999"])
def test_a_budget_outside_the_machine_is_refused_with_the_range(tmp_path, budget):
    done = start_worker(tmp_path, "--memory-budget-mb", budget)
    ram_mb = memory_info().total >> 20
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --memory-budget-mb"), done.stderr
    floor = -(-_kept_baseline(tmp_path) // MIB)  # measured at start, kept for the next
    assert f"give {floor}..{ram_mb} MiB" in lines[0], lines[0]
    assert not (tmp_path / "ready").exists()


def _kept_baseline(tmp_path) -> int:
    kept = json.loads((tmp_path / "cache" / "baseline.json").read_text())
    assert len(kept) == 1, kept  # one figure, for this version and thread count
    return next(iter(kept.values()))


def test_the_budget_floor_is_the_process_measured_here(tmp_path):
    refused = start_worker(tmp_path, "--memory-budget-mb", "1")
    assert refused.returncode == 1, refused.stderr
    floor = -(-_kept_baseline(tmp_path) // MIB)
    assert 40 < floor < PROCESS_BASELINE_BYTES // MIB, f"an idle worker measured {floor} MiB"
    served = start_worker(tmp_path, "--memory-budget-mb", str(floor))
    assert (tmp_path / "ready").exists(), served.stderr  # the assumed 160 MiB would refuse it


def test_more_threads_than_cores_are_warned_about(tmp_path):
    done = start_worker(tmp_path, "--threads", "1000")
    assert (tmp_path / "ready").exists(), done.stderr  # served all the same
    assert f"--threads 1000 (ORCH_WORKER_THREADS) is more than the {cpu_info().cores} " \
           f"cores" in done.stderr.replace("\n", " "), done.stderr


def test_install_warns_about_a_program_under_tmp(tmp_path):
    said: list[str] = []
    install(InstallRequest(root=tmp_path / "root", token=TOKEN, enable=False,
                           exec_path="/tmp/venv/bin/orch"), said.append)
    warnings = [line for line in said if line.startswith("warning:")]
    assert warnings and "PrivateTmp=yes" in warnings[0] and "/opt/orch" in warnings[0], said
    said.clear()
    install(InstallRequest(root=tmp_path / "root", enable=False,
                           exec_path="/opt/orch/bin/orch"), said.append)
    assert not [line for line in said if "PrivateTmp" in line], said


def test_a_bad_flag_is_named_as_the_user_gave_it(tmp_path):
    done = start_worker(tmp_path, "--port", "99999")
    assert done.returncode != 0
    assert "--port (ORCH_WORKER_PORT)" in done.stderr and "port:" not in done.stderr, \
        done.stderr
