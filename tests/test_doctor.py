"""`orch doctor` on deliberately broken setups: each gets the advice that fixes it. Real
parts only: env files in a temporary folder, a real listening socket, a real worker on
loopback, a real small tmpfs for a nearly full disk (when this process may mount one),
zeroconf on loopback, llama.cpp in its child process."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from orchcore.cpu import cpu_info
from testkit.waiting import wait_until
from worker import doctor
from worker.doctor import Status, disk_status, doctor_options, run_checks, to_json
from worker.settings import WorkerSettings

TOKEN = "a-cluster-token-long-enough-for-the-doctor"


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch):
    for var in ("ORCH_WORKER_TOKEN", "ORCH_TOKEN", "ORCH_WORKER_HOST", "ORCH_WORKER_PORT"):
        monkeypatch.delenv(var, raising=False)


def env_file(path: Path, mode: int = 0o600, **values: str) -> Path:
    path.write_text("".join(f"ORCH_WORKER_{k.upper()}={v}\n" for k, v in values.items()))
    path.chmod(mode)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check(name: str, options: doctor.DoctorOptions) -> doctor.Check:
    [one] = run_checks(dataclasses.replace(options, only=frozenset({name})))
    assert one.name == name
    return one


def options_for(tmp_path: Path, mode: int = 0o600, **values: str) -> doctor.DoctorOptions:
    values = {"cache_dir": str(tmp_path / "cache"), "discovery": "off", **values}
    return doctor_options(WorkerSettings, env_file=env_file(tmp_path / "worker.env", mode,
                                                            **values))


def test_missing_token_says_how_to_make_one(tmp_path):
    lan = check("token", options_for(tmp_path, host="0.0.0.0"))
    assert lan.status is Status.FAIL
    assert "no cluster token" in lan.found
    assert "secrets.token_urlsafe(32)" in lan.advice
    assert f"ORCH_WORKER_TOKEN in {tmp_path / 'worker.env'}" in lan.advice
    assert "ORCH_TOKEN" in lan.advice
    loopback = check("token", options_for(tmp_path, host="127.0.0.1"))
    assert loopback.status is Status.WARN  # one machine alone: not a failure


def test_a_world_readable_token_file_must_be_chmod_600(tmp_path, monkeypatch):
    path = tmp_path / "worker.env"
    readable = check("token", options_for(tmp_path, 0o644, token=TOKEN, host="0.0.0.0"))
    assert readable.status is Status.FAIL
    assert "mode 0644" in readable.found and "other users can read the token" in readable.found
    assert readable.advice.startswith(f"chmod 600 {path}")
    private = check("token", options_for(tmp_path, 0o600, token=TOKEN, host="0.0.0.0"))
    assert private.status is Status.OK, private
    assert f"ORCH_WORKER_TOKEN in {path}" in private.found and "mode 0600" in private.found
    monkeypatch.setenv("ORCH_TOKEN", "another-token-for-the-orchestrator")
    differ = check("token", options_for(tmp_path, 0o600, token=TOKEN))
    assert differ.status is Status.WARN and "the tokens differ" in differ.found
    assert "one token everywhere" in differ.advice


def test_a_short_token_is_flagged(tmp_path):
    short = check("token", options_for(tmp_path, token="abc", host="127.0.0.1"))
    assert short.status is Status.WARN and "fewer than 16" in short.found, short
    lan = check("token", options_for(tmp_path, token="abc", host="0.0.0.0"))
    assert lan.status is Status.FAIL and "a worker on the LAN refuses it" in lan.found, lan


def test_a_busy_port_is_named_with_its_holder(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        busy = check("port", options_for(tmp_path, host="127.0.0.1", port=str(port)))
    assert busy.status is Status.FAIL
    assert f"127.0.0.1:{port} is taken by " in busy.found and f"(pid {os.getpid()})" in busy.found
    assert "not by an orch worker" in busy.found
    assert "ORCH_WORKER_PORT" in busy.advice and "--port" in busy.advice
    free = check("port", options_for(tmp_path, host="0.0.0.0", port=str(port)))
    assert free.status is Status.OK and "is free" in free.found


def test_a_port_held_by_an_orch_worker_is_not_a_failure(tmp_path):
    from worker.server import serve

    ready = tmp_path / "ready"
    settings = WorkerSettings(host="127.0.0.1", port=0, cache_dir=tmp_path / "w", token=TOKEN,
                              discovery="off", ready_file=ready)
    stop = threading.Event()
    server = threading.Thread(target=serve, args=(settings,), kwargs={"stop": stop})
    server.start()
    try:
        wait_until(ready.exists, 30, "the worker to be ready")
        port = ready.read_text().rsplit(":", 1)[1]
        ours = check("port", options_for(tmp_path, host="127.0.0.1", port=port, token=TOKEN))
        theirs = check("port", options_for(tmp_path, host="127.0.0.1", port=port,
                                           token="not-the-token-the-worker-has"))
    finally:
        stop.set()
        server.join(30)
    assert ours.status is Status.OK, ours
    assert "taken by an orch worker" in ours.found and "it is running" in ours.found
    assert theirs.status is Status.WARN and "another token" in theirs.found
    assert "restart" in theirs.advice


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 16 MiB tmpfs (needs root and a working mount), else None."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)],
                             capture_output=True)
    if mounted.returncode:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_cache_on_a_nearly_full_disk_fails(tmp_path, small_disk, monkeypatch):
    if small_disk is None:  # no tmpfs here: the same disk, reported 16 MiB free
        small_disk = tmp_path / "small"
        monkeypatch.setattr(doctor.shutil, "disk_usage",
                            lambda path: shutil._ntuple_diskusage(16 << 20, 0, 16 << 20))
    full = check("disk", options_for(tmp_path, cache_dir=str(small_disk / "cache")))
    assert full.status is Status.FAIL
    assert f"{small_disk / 'cache'}: 16 MiB free of 16 MiB" in full.found
    assert "nearly full" in full.advice and "ORCH_WORKER_CACHE_DIR" in full.advice


def test_disk_limits():
    gib = 1 << 30
    assert disk_status(gib - 1, 8 * gib) is Status.FAIL  # under 1 GiB
    assert disk_status(4 * gib, 100 * gib) is Status.FAIL  # under 5%
    assert disk_status(3 * gib, 10 * gib) is Status.WARN  # room for small models only
    assert disk_status(50 * gib, 100 * gib) is Status.OK


def test_bad_settings_in_the_env_file_are_named(tmp_path):
    path = tmp_path / "worker.env"
    path.write_text("ORCH_WORKER_PORT=fifty\nORCH_WORKER_PROT=1\n")
    options = doctor_options(WorkerSettings, env_file=path)
    bad = check("settings", options)
    assert bad.status is Status.FAIL
    assert "ORCH_WORKER_PROT is not a worker setting" in bad.found, bad.found
    assert "ORCH_WORKER_PORT: " in bad.found, bad.found
    assert options.port == WorkerSettings().port  # the other checks go on with the default
    missing = check("settings", doctor_options(WorkerSettings, env_file=tmp_path / "nope"))
    assert missing.status is Status.FAIL and "does not exist" in missing.found


def test_discovery_off_and_a_missing_interface(tmp_path):
    off = check("multicast", options_for(tmp_path))
    assert off.status is Status.WARN and "--workers" in off.advice
    nowhere = check("multicast", options_for(tmp_path, discovery="no-such-if0"))
    assert nowhere.status is Status.FAIL and "ORCH_WORKER_DISCOVERY" in nowhere.advice


def test_a_healthy_machine(tmp_path):
    """Everything set up right: the engine runs, zeroconf sees itself on loopback, and
    nothing fails (the clock may be unknown or unsynchronised here: a warning at most)."""
    options = options_for(tmp_path, token=TOKEN, host="0.0.0.0", port=str(free_port()),
                          discovery="lo")
    start = time.monotonic()
    checks = run_checks(options)
    elapsed = time.monotonic() - start
    by_name = {c.name: c for c in checks}
    assert list(by_name) == list(doctor.CHECKS)
    for name in ("settings", "engine", "cpu", "port", "multicast", "token"):
        assert by_name[name].status is Status.OK, by_name[name]
    assert "evaluated 3 tokens" in by_name["engine"].found
    decided = "off" if cpu_info().has_amx else "on"
    assert f"extra buffer types are {decided}" in by_name["cpu"].found
    assert "a worker would get a budget of" in by_name["memory"].found
    assert by_name["time"].status is not Status.FAIL
    assert not doctor.failed(checks), checks
    assert elapsed < 20, f"the doctor took {elapsed:.1f} s"
    data = json.loads(json.dumps(to_json(checks)))
    assert data["checks"][1] == {"name": "engine", "status": "ok",
                                 "found": by_name["engine"].found, "advice": ""}
    out = io.StringIO()
    doctor.render_table(checks, Console(file=out, width=200))
    assert "orch doctor" in out.getvalue() and "evaluated 3 tokens" in out.getvalue()


def _orch_doctor(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "doctor", "--json", *args],
                          env=env, capture_output=True, text=True, timeout=60)


def test_the_command_line(tmp_path):
    port = str(free_port())
    good = env_file(tmp_path / "good.env", token=TOKEN, host="0.0.0.0", discovery="lo")
    done = _orch_doctor("--env-file", str(good), "--port", port, "--cache-dir",
                        str(tmp_path / "cache"))
    report = json.loads(done.stdout)
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["engine"] == statuses["token"] == statuses["port"] == "ok", report
    assert done.returncode == (0 if report["ok"] else 1)
    bad = env_file(tmp_path / "bad.env", 0o644, token=TOKEN, discovery="off")
    failed = _orch_doctor("--env-file", str(bad), "--port", port)
    assert failed.returncode == 1, failed.stderr
    [token] = [c for c in json.loads(failed.stdout)["checks"] if c["name"] == "token"]
    assert token["status"] == "fail" and token["advice"].startswith(f"chmod 600 {bad}")
