"""``orch worker install`` / ``uninstall``: the worker as a systemd service on this machine,
or staged under a root folder (an SD card image being prepared, a test).

The files come from ``worker/units.py``; this module reads what is there, writes, and runs
systemctl. Every step is reported as one line through ``say``. An existing install is
upgraded in place: its token, port, budget, cache size and added settings are kept unless
given again, and its worker id (StateDirectory=) and shard cache (CacheDirectory=) are not
touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchcore import clustertoken
from orchcore.cpu import memory_info
from orchcore.errors import ServiceInstallError
from orchcore.files import write_atomic
from orchcore.memory import MIB, default_budget
from worker.units import (
    BUDGET,
    CACHE_DIRS,
    CACHE_MAX,
    DEFAULT_PORT,
    ENV_FILE,
    HOST,
    PORT,
    STATE_DIRS,
    TOKEN,
    UNIT_FILE,
    UNIT_NAME,
    WorkerConfig,
    kept_lines,
    memory_max_mb,
    parse_env,
    render_env,
    render_worker_unit,
)

Say = Callable[[str], None]
_HOMES = (Path("/home"), Path("/root"), Path("/run/user"))  # hidden by ProtectHome=yes
_PRIVATE_TMPS = (Path("/tmp"), Path("/var/tmp"))  # the service's own, by PrivateTmp=yes


@dataclass(frozen=True)
class InstallRequest:
    root: Path = Path("/")
    token: str | None = None
    port: int | None = None
    budget_mb: int | None = None
    cache_max_mb: int | None = None
    enable: bool = True
    exec_path: str | None = None  # None: the `orch` of this installation


def orch_executable() -> str:
    """The absolute path of the running installation's ``orch`` command: next to its
    Python (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "orch"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    if found := shutil.which("orch"):
        return str(Path(found).absolute())
    raise ServiceInstallError(f"no `orch` command next to {sys.executable} or on PATH: "
                              f"install orch (pip install orch-cluster) first")


def systemd_running() -> bool:
    """Whether this machine was booted with systemd (its ``sd_booted`` test)."""
    return Path("/run/systemd/system").is_dir()


def _live(root: Path) -> str | None:
    """None when systemctl may be run for ``root``, else why not."""
    if root.resolve() != Path("/"):
        return f"{root} is a staging root"
    if not systemd_running():
        return "systemd is not running on this machine (not PID 1)"
    return None


def install(request: InstallRequest, say: Say) -> None:
    root = request.root
    env_path, unit_path = root / ENV_FILE, root / UNIT_FILE
    exec_path = request.exec_path or orch_executable()
    why_not_live = _live(root)
    _check_reachable(exec_path, why_not_live, say)
    old_text = _read(env_path)
    old = parse_env(old_text) if old_text is not None else {}
    upgrade = old_text is not None or unit_path.exists()
    config = WorkerConfig(
        token=request.token if request.token is not None else
        old.get(TOKEN) or clustertoken.generate(),
        port=_pick(request.port, old.get(PORT), DEFAULT_PORT),
        budget_mb=_pick(request.budget_mb, old.get(BUDGET),
                        default_budget(memory_info().available) // MIB),
        cache_max_mb=_pick(request.cache_max_mb, old.get(CACHE_MAX), 0),
        host=old.get(HOST) or "0.0.0.0", kept=kept_lines(old_text or ""))
    _write(env_path, render_env(config), 0o600)
    say(f"{'updated' if old_text is not None else 'wrote'} {env_path} (mode 0600): "
        f"{_token_note(request.token, old.get(TOKEN))}, port {config.port}, memory budget "
        f"{config.budget_mb} MiB, shard cache at most "
        f"{config.cache_max_mb or 'half the free disk at start'}"
        f"{' MiB' if config.cache_max_mb else ''}"
        + (f", kept {len(config.kept)} other settings" if config.kept else ""))
    _warn_private_tmp(exec_path, say)
    _write(unit_path, render_worker_unit(exec_path, config.budget_mb), 0o644)
    say(f"{'updated' if upgrade else 'wrote'} {unit_path}: ExecStart={exec_path} worker, "
        f"MemoryMax={memory_max_mb(config.budget_mb)}M (budget + margin)")
    _report_kept(root, say)
    if not request.enable or why_not_live:
        say(f"not started ({why_not_live or '--no-enable'}); to "
            f"start it there: systemctl daemon-reload && systemctl enable {UNIT_NAME} && "
            f"systemctl restart {UNIT_NAME}")
        return
    _systemctl(say, "daemon-reload")
    _systemctl(say, "enable", UNIT_NAME)
    _systemctl(say, "restart", UNIT_NAME)  # starts a stopped unit; waits for READY=1
    say(f"{UNIT_NAME} is running; follow it with: journalctl -u {UNIT_NAME} -f")


def uninstall(root: Path, purge: bool, say: Say) -> None:
    env_path, unit_path = root / ENV_FILE, root / UNIT_FILE
    why_not_live = _live(root)
    if why_not_live is None and unit_path.exists():
        _systemctl(say, "disable", "--now", UNIT_NAME)
    for path in (unit_path, env_path):
        if path.exists():
            path.unlink()
            say(f"removed {path}")
    if env_path.parent.is_dir() and not any(env_path.parent.iterdir()):
        env_path.parent.rmdir()
        say(f"removed {env_path.parent}")
    if why_not_live is None:
        _systemctl(say, "daemon-reload")
    else:
        say(f"systemctl not run ({why_not_live})")
    kept = [p for p in (*STATE_DIRS, *CACHE_DIRS) if (root / p).is_symlink() or
            (root / p).exists()]
    for relative in kept:
        path = root / relative
        if purge:
            if path.is_symlink() or path.is_file():
                path.unlink()
            else:
                shutil.rmtree(path)
            say(f"removed {path}")
    if kept and not purge:
        say(f"kept the worker id and shard cache ({', '.join(str(root / p) for p in kept)}); "
            f"`orch worker uninstall --purge` removes them")


def _pick(given: int | None, old: str | None, default: int) -> int:
    if given is not None:
        return given
    if old is not None:
        try:
            return int(old)
        except ValueError:
            raise ServiceInstallError(f"the existing env file has {old!r} where a number "
                                      f"belongs; fix it or give the value again") from None
    return default


def _token_note(given: str | None, old: str | None) -> str:
    if given:
        return "the given cluster token" + (" (replacing the old one)" if old and
                                             old != given else "")
    if old:
        return "cluster token kept"
    return ("a new random cluster token (give every worker and orchestrator the same: "
            "--token here, ORCH_TOKEN for orch run)")


def _check_reachable(exec_path: str, why_not_live: str | None, say: Say) -> None:
    """A unit with ProtectHome=yes cannot run a program kept in a home folder."""
    path = Path(exec_path)
    home = next((h for h in _HOMES if path.is_relative_to(h)), None)
    if home is None:
        return
    problem = (f"{exec_path} is under {home}, which the service cannot see (ProtectHome=yes, "
               f"and its user is not the owner): install orch outside home folders, e.g. "
               f"sudo python3 -m venv /opt/orch && sudo /opt/orch/bin/pip install "
               f"orch-cluster, then run /opt/orch/bin/orch worker install")
    if why_not_live is None:
        raise ServiceInstallError(problem)
    say(f"warning: {problem}")


def _warn_private_tmp(exec_path: str, say: Say) -> None:
    """The unit has PrivateTmp=yes: the service sees a /tmp (and /var/tmp) of its own,
    empty, so a program kept there is not found when it starts."""
    tmp = next((t for t in _PRIVATE_TMPS if Path(exec_path).is_relative_to(t)), None)
    if tmp is not None:
        say(f"warning: ExecStart={exec_path} is under {tmp}, which the service sees empty "
            f"(PrivateTmp=yes): it will not start; install orch outside {tmp}, e.g. "
            f"/opt/orch")


def _report_kept(root: Path, say: Say) -> None:
    for relative in STATE_DIRS:
        worker_id = root / relative / "worker-id"
        if worker_id.is_file():
            say(f"kept worker id {worker_id.read_text().strip()[:8]} ({worker_id})")
            break
    for relative in CACHE_DIRS:
        shards = root / relative / "shards"
        if shards.is_dir():
            used = sum(p.stat().st_size for p in shards.rglob("*") if p.is_file())
            say(f"kept the shard cache {shards} ({used / MIB:.0f} MiB)")
            break


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ServiceInstallError(f"cannot read {path}: {exc.strerror}; run as root "
                                  f"(sudo)") from None


def _write(path: Path, text: str, mode: int) -> None:
    try:
        write_atomic(path, text, mode=mode)
    except OSError as exc:
        raise ServiceInstallError(f"cannot write {path}: {exc.strerror}; run as root (sudo), "
                                  f"or stage the files with --root DIR") from None


def _systemctl(say: Say, *args: str) -> None:
    command = ["systemctl", *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ServiceInstallError(
            f"`{' '.join(command)}` failed ({done.returncode}): "
            f"{(done.stderr or done.stdout).strip()}; see journalctl -u {UNIT_NAME}")
    say(f"ran {' '.join(command)}")
