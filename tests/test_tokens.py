"""Token rotation: one command gives every worker a new token; the old one keeps working
for the grace period (running pipelines carry on), then is refused; a restarted worker
keeps the new token."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from orchcore.errors import AuthError, ClusterTokenError
from orchestrator.cluster.client import WorkerClient
from orchestrator.settings import OrchSettings
from testkit.cluster import worker_server
from worker.tokens import Tokens

OLD, NEW = "old-token-0123456789", "new-token-9876543210"


def info_with(address: str, token: str) -> str:
    client = WorkerClient(address, token, OrchSettings())
    try:
        return client.info().worker_id
    finally:
        client.close()


def test_rotate_token_on_every_worker(tmp_path) -> None:
    with worker_server(tmp_path / "a", token=OLD, token_grace_s=2) as a, \
            worker_server(tmp_path / "b", token=OLD, token_grace_s=2) as b:
        env = dict(os.environ, ORCH_TOKEN=OLD)
        done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "rotate-token",
                               "--workers", f"{a},{b}", "--new", "-"], input=NEW + "\n",
                              env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == NEW and done.stderr.count("rotated") == 2
        for address in (a, b):
            assert info_with(address, NEW) and info_with(address, OLD)  # grace period
        time.sleep(2.5)
        for address in (a, b):
            assert info_with(address, NEW)
            with pytest.raises(AuthError):
                info_with(address, OLD)
    (tmp_path / "a" / "ready").unlink()
    with worker_server(tmp_path / "a", token=OLD) as again:  # restarted: the new one stays
        assert info_with(again, NEW)
        with pytest.raises(AuthError):
            info_with(again, OLD)
    assert oct((tmp_path / "a" / "cache" / "token").stat().st_mode & 0o777) == "0o600"


def test_a_worker_that_cannot_be_reached_is_named(tmp_path) -> None:
    env = dict(os.environ, ORCH_TOKEN=OLD)
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "rotate-token",
                           "--workers", "127.0.0.1:9"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert "127.0.0.1:9: not rotated" in done.stderr and "still use the old token" in done.stderr


def test_weak_tokens_are_refused(tmp_path) -> None:
    tokens = Tokens(OLD, tmp_path / "token")
    with pytest.raises(ClusterTokenError, match="fewer than 16"):
        tokens.rotate("short", 10)
    with pytest.raises(ClusterTokenError):
        tokens.rotate("has spaces in it, not allowed", 10)
    assert tokens.current == OLD and not (tmp_path / "token").exists()
