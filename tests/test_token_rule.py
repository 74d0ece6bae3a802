"""One cluster-token rule: `orch worker`, `orch worker install`, `orch rotate-token`,
`orch image` and `orch doctor` give the same verdict on the same token, on the LAN and on
loopback (where a short token is only warned about)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchcore import clustertoken
from orchcore.clustertoken import Verdict
from orchcore.errors import ClusterTokenError
from testkit.cluster import worker_once
from testkit.pipublish import published_wheels
from worker import doctor
from worker.doctor import Status, doctor_options, run_checks
from worker.settings import WorkerSettings
from worker.tokens import Tokens

# token -> (verdict for a worker on the LAN, verdict on loopback)
TABLE = {
    "a-good-cluster-token-0123": (Verdict.OK, Verdict.OK),
    "tencharsxx": (Verdict.REFUSED, Verdict.WARN),
    "with:colon-0123456789": (Verdict.REFUSED, Verdict.REFUSED),
    "two words in one token": (Verdict.REFUSED, Verdict.REFUSED),
}
DOCTOR = {Status.OK: Verdict.OK, Status.WARN: Verdict.WARN, Status.FAIL: Verdict.REFUSED}


def orch(*args: str, stdin: str = "", env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def verdict_of(done: subprocess.CompletedProcess[str]) -> Verdict:
    if done.returncode != 0:
        assert "the cluster token" in done.stderr, done.stderr  # refused for the token
        return Verdict.REFUSED
    return Verdict.WARN if "the cluster token" in done.stderr else Verdict.OK


def install_verdict(token: str, root: Path) -> Verdict:
    return verdict_of(orch("worker", "install", "--root", str(root), "--token", "-",
                           "--no-enable", stdin=token + "\n"))


def worker_verdict(token: str, host: str, tmp: Path) -> Verdict:
    """`orch worker` started with the token: refused at once, or serving (then stopped)."""
    done = worker_once(tmp, token, host=host)
    assert (tmp / "ready").exists() or done.returncode == 1, \
        f"neither served nor refused: {done.stderr}"
    return verdict_of(done)


def doctor_verdict(token: str, host: str, tmp: Path) -> Verdict:
    env = tmp / "worker.env"
    env.write_text(f"ORCH_WORKER_TOKEN='{token}'\nORCH_WORKER_HOST={host}\n")
    env.chmod(0o600)
    options = doctor_options(WorkerSettings, env_file=env)
    [check] = run_checks(doctor.DoctorOptions(**{**options.__dict__,
                                                 "only": frozenset({"token"})}))
    return DOCTOR[check.status]


def rotate_verdict(token: str, loopback: bool, tmp: Path) -> Verdict:
    tokens = Tokens("the-current-token-0123456789", tmp / "token", loopback=loopback)
    try:
        tokens.rotate(token, 1)
    except ClusterTokenError:
        return Verdict.REFUSED
    return clustertoken.judge(token, loopback=loopback).verdict  # accepted: warned or not


def image_verdict(token: str, wheels: tuple[str, dict[str, str]], tmp: Path) -> Verdict:
    card = tmp / "bootfs"
    card.mkdir(parents=True)
    (card / "config.txt").write_text("arm_64bit=1\n")
    token_file = tmp / "token.txt"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    url, env = wheels
    return verdict_of(orch("image", "--boot-dir", str(card), "--token-file", str(token_file),
                           "--wheels-url", url, env=env))


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    with published_wheels(tmp_path_factory.mktemp("publish")) as served:
        yield served


@pytest.mark.parametrize("token", list(TABLE))
def test_every_command_gives_the_same_verdict(token, wheels, tmp_path):
    lan, loopback = TABLE[token]
    assert clustertoken.judge(token, loopback=False).verdict is lan
    assert clustertoken.judge(token, loopback=True).verdict is loopback
    on_lan = {
        "install": install_verdict(token, tmp_path / "root"),
        "worker": worker_verdict(token, "0.0.0.0", tmp_path / "lan"),
        "image": image_verdict(token, wheels, tmp_path / "image"),
        "doctor": doctor_verdict(token, "0.0.0.0", tmp_path),
        "rotate-token": rotate_verdict(token, False, tmp_path),
    }
    assert on_lan == dict.fromkeys(on_lan, lan), f"{token!r} on the LAN: {on_lan}"
    on_loopback = {
        "worker": worker_verdict(token, "127.0.0.1", tmp_path / "loopback"),
        "doctor": doctor_verdict(token, "127.0.0.1", tmp_path),
        "rotate-token": rotate_verdict(token, True, tmp_path),
    }
    assert on_loopback == dict.fromkeys(on_loopback, loopback), \
        f"{token!r} on loopback: {on_loopback}"


def test_an_empty_token_on_standard_input_is_an_error(tmp_path):
    done = orch("worker", "install", "--root", str(tmp_path), "--token", "-", "--no-enable",
                stdin="")
    assert done.returncode == 1 and "standard input held no token" in done.stderr, done.stderr
    assert not (tmp_path / "etc").exists(), "a token was generated instead"
