"""The worker as a systemd service: the units pass `systemd-analyze verify` and rate well in
`systemd-analyze security`, the shipped unit is what the installer renders, and
`orch worker install` / `uninstall` write, upgrade and remove the files in a staging root.
(No systemd runs as PID 1 here: starting the unit itself is for a real host; see
tests/test_sandbox.py for the worker under the unit's restrictions.)"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from orchcore.errors import InvalidSettingError
from worker.install import orch_executable
from worker.settings import WorkerSettings
from worker.units import (
    DEFAULT_EXEC,
    WorkerConfig,
    memory_max_mb,
    parse_env,
    render_env,
    render_worker_unit,
)

DEPLOY = Path(__file__).parent.parent / "deploy" / "systemd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed "
                                   "(scripts/test-deps.sh installs it)")
TOKEN = "a-cluster-token-for-the-install-tests"


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60)


def orch(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, COLUMNS="200"))


@pytest.fixture
def units(tmp_path) -> dict[str, Path]:
    """Both units with ExecStart= naming this installation's orch (verify checks it)."""
    here = orch_executable()
    worker = tmp_path / "orch-worker.service"
    worker.write_text(render_worker_unit(here, 3072))
    serve = tmp_path / "orch-serve.service"
    serve.write_text((DEPLOY / "orch-serve.service").read_text().replace(DEFAULT_EXEC, here))
    return {"worker": worker, "serve": serve}


def test_the_shipped_worker_unit_is_the_rendered_one():
    assert (DEPLOY / "orch-worker.service").read_text() == \
        render_worker_unit(DEFAULT_EXEC, 3072)
    assert f"ExecStart={DEFAULT_EXEC} serve " in (DEPLOY / "orch-serve.service").read_text()


@needs_analyze
def test_systemd_analyze_verify_accepts_both_units(units, tmp_path):
    done = analyze("verify", *map(str, units.values()))
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), \
        done.stderr
    missing = tmp_path / "broken" / "orch-worker.service"  # verify does look at ExecStart
    missing.parent.mkdir()
    missing.write_text(render_worker_unit("/nonexistent/bin/orch", 3072))
    assert analyze("verify", str(missing)).returncode != 0


@needs_analyze
@pytest.mark.parametrize("unit", ["worker", "serve"])
def test_systemd_analyze_security_rates_the_units_4_or_better(units, unit):
    done = analyze("security", "--offline=yes", str(units[unit]))
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found[1]) <= 4.0, done.stdout


def test_unit_directives_the_brief_relies_on():
    unit = render_worker_unit(DEFAULT_EXEC, 3072)
    directives = dict(line.split("=", 1) for line in unit.splitlines()
                      if line and not line.startswith(("#", "[")) and "=" in line
                      and not line.startswith("SystemCallFilter"))
    assert directives["Type"] == "notify" and directives["WatchdogSec"] == "90"
    assert directives["EnvironmentFile"] == "/etc/orch/worker.env"
    assert directives["StateDirectory"] == directives["CacheDirectory"] == "orch"
    assert directives["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX AF_NETLINK"
    assert directives["CapabilityBoundingSet"] == "" and directives["DynamicUser"] == "yes"
    assert "MemoryDenyWriteExecute" not in directives  # libffi closures: see the comment
    assert directives["MemoryMax"] == "3840M"  # 3072 + a quarter
    assert "SystemCallFilter=@system-service" in unit.splitlines()


def test_memory_max_adds_a_quarter_at_least_256_mib():
    assert memory_max_mb(3072) == 3840
    assert memory_max_mb(512) == 768
    assert memory_max_mb(16384) == 20480


def test_env_file_values_are_checked_and_read_back():
    config = WorkerConfig(token=TOKEN, port=50151, budget_mb=900, cache_max_mb=0,
                          kept=("ORCH_WORKER_THREADS=2",))
    assert parse_env(render_env(config)) == {
        "ORCH_WORKER_TOKEN": TOKEN, "ORCH_WORKER_HOST": "0.0.0.0", "ORCH_WORKER_PORT": "50151",
        "ORCH_WORKER_MEMORY_BUDGET_MB": "900", "ORCH_WORKER_CACHE_MAX_MB": "0",
        "ORCH_WORKER_THREADS": "2"}
    for bad in ({"token": "two words"}, {"token": "short"}, {"port": 0}, {"budget_mb": 0}):
        with pytest.raises(InvalidSettingError):
            WorkerConfig(**{"token": TOKEN, "port": 1, "budget_mb": 1, "cache_max_mb": 0,
                            **bad})
    with pytest.raises(InvalidSettingError, match="plain absolute path"):
        render_worker_unit("/opt/my orch/bin/orch", 900)


def test_worker_takes_its_folders_from_systemd(monkeypatch, tmp_path):
    monkeypatch.delenv("ORCH_WORKER_CACHE_DIR", raising=False)
    monkeypatch.setenv("CACHE_DIRECTORY", f"{tmp_path}/cache:{tmp_path}/other")
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    settings = WorkerSettings()
    assert settings.cache_dir == tmp_path / "cache" / "shards"
    assert settings.state_dir == tmp_path / "state"
    assert WorkerSettings(cache_dir=tmp_path / "mine").cache_dir == tmp_path / "mine"
    monkeypatch.delenv("STATE_DIRECTORY")
    assert WorkerSettings().state_dir == tmp_path / "cache" / "shards"  # as before services


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_upgrade_and_uninstall_in_a_staging_root(tmp_path):
    root = tmp_path / "root"
    env, unit = root / "etc/orch/worker.env", root / "etc/systemd/system/orch-worker.service"
    done = orch("worker", "install", "--root", str(root), "--budget-mb", "1200",
                "--cache-max-mb", "4096", "--no-enable")
    assert done.returncode == 0, done.stderr
    # (a checkout under /home or /root adds a warning: the service could not see it)
    lines = [line for line in done.stdout.splitlines() if not line.startswith("warning:")]
    assert lines[0].startswith(f"wrote {env} (mode 0600): a new random cluster token")
    assert lines[1] == (f"wrote {unit}: ExecStart={orch_executable()} worker, "
                        f"MemoryMax=1500M (budget + margin)")
    assert lines[-1].startswith(f"not started ({root} is a staging root); to start it there:")
    assert _mode(env) == 0o600 and _mode(unit) == 0o644
    values = parse_env(env.read_text())
    token = values["ORCH_WORKER_TOKEN"]
    assert len(token) >= 40 and values["ORCH_WORKER_HOST"] == "0.0.0.0"
    assert values["ORCH_WORKER_PORT"] == "50151"
    assert values["ORCH_WORKER_MEMORY_BUDGET_MB"] == "1200"
    assert values["ORCH_WORKER_CACHE_MAX_MB"] == "4096"
    assert unit.read_text() == render_worker_unit(orch_executable(), 1200)
    if ANALYZE:
        assert analyze("verify", str(unit)).returncode == 0

    # The service ran: systemd made its folders, the worker its id and cache; a user added
    # a setting. An upgrade changes the port and keeps all that.
    state, shards = root / "var/lib/private/orch", root / "var/cache/private/orch/shards"
    state.mkdir(parents=True)
    (state / "worker-id").write_text("0123456789abcdef0123456789abcdef\n")
    shards.mkdir(parents=True)
    (shards / "ab").mkdir()
    (shards / "ab" / "shard").write_bytes(b"\0" * (3 << 20))
    (root / "var/lib/orch").symlink_to("private/orch")
    env.write_text(env.read_text().replace("HOST=0.0.0.0", "HOST=192.168.1.20") +
                   "ORCH_WORKER_THREADS=2\n")
    done = orch("worker", "install", "--root", str(root), "--port", "50200", "--no-enable")
    assert done.returncode == 0, done.stderr
    assert f"updated {env} (mode 0600): cluster token kept, port 50200, memory budget 1200 " \
           f"MiB, shard cache at most 4096 MiB, kept 1 other settings" in done.stdout
    assert f"kept worker id 01234567 ({root / 'var/lib/orch/worker-id'})" in done.stdout
    assert f"kept the shard cache {shards} (3 MiB)" in done.stdout
    values = parse_env(env.read_text())
    assert values["ORCH_WORKER_TOKEN"] == token and values["ORCH_WORKER_PORT"] == "50200"
    assert values["ORCH_WORKER_THREADS"] == "2" and _mode(env) == 0o600
    assert values["ORCH_WORKER_HOST"] == "192.168.1.20"

    done = orch("worker", "install", "--root", str(root), "--token", "-", "--no-enable",
                stdin=f"{TOKEN}\n")  # off the command line
    assert "the given cluster token (replacing the old one)" in done.stdout
    assert parse_env(env.read_text())["ORCH_WORKER_TOKEN"] == TOKEN

    done = orch("worker", "uninstall", "--root", str(root))
    assert done.returncode == 0, done.stderr
    assert f"removed {unit}\nremoved {env}\nremoved {env.parent}\n" in done.stdout
    assert not unit.exists() and not env.parent.exists()
    assert (state / "worker-id").exists() and "uninstall --purge" in done.stdout
    done = orch("worker", "uninstall", "--root", str(root), "--purge")
    assert done.returncode == 0, done.stderr
    assert not (root / "var/lib/orch").is_symlink() and not state.exists()
    assert not shards.exists() and not (root / "var/cache/orch").exists()


def test_install_refuses_bad_values_before_writing(tmp_path):
    done = orch("worker", "install", "--root", str(tmp_path), "--token", "has space x",
                "--no-enable")
    assert done.returncode == 1 and "secrets.token_urlsafe(32)" in done.stderr
    done = orch("worker", "install", "--root", str(tmp_path), "--port", "0", "--no-enable")
    assert done.returncode == 1 and "a fixed port" in done.stderr
    assert not (tmp_path / "etc").exists()
