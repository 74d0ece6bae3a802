"""``orch doctor``: what this machine needs to run orch, checked, with what to do about it.

``run_checks(options)`` returns one ``Check`` per subject (name, status, what was found,
what to do), in a fixed order; ``render_table`` and ``to_json`` show them. The options are
the worker settings this machine would run with: the CLI reads them through
``doctor_options(WorkerSettings, ...)`` (flags, then the env file a service reads, then
``ORCH_WORKER_*`` in the environment, then the defaults). Env files are read with the
installer's own reader (``worker.units.parse_env``), tokens judged by the one rule
(``orchcore.clustertoken``).

The engine check runs llama.cpp in a child process: a build that crashes on this CPU
(an illegal instruction, ggml's AMX kernels) is reported instead of taking the doctor
with it. It runs while the other checks do.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from orchcore import clustertoken
from orchcore.cpu import memory_info
from orchcore.memory import MIB, default_budget
from worker.checkup import (
    _TOKEN_HELP,
    DEFAULT_ENV_FILE,
    DISK_FAIL_BYTES,
    DISK_FAIL_FRACTION,
    DISK_WARN_BYTES,
    GIB,
    MEMORY_WARN_BYTES,
    Check,
    DoctorOptions,
    Status,
    doctor_options,
)
from worker.doctor_engine import _EngineRun, check_cpu
from worker.doctor_net import check_multicast, check_port

__all__ = ["CHECKS", "Check", "DoctorOptions", "Status", "disk_status", "doctor_options",
           "failed", "render_table", "run_checks", "to_json"]


def run_checks(options: DoctorOptions) -> list[Check]:
    """Every check (or ``options.only``), in the order of ``CHECKS``."""
    wanted = [name for name in CHECKS if options.only is None or name in options.only]
    engine = _EngineRun() if "engine" in wanted else None
    done = {name: CHECKS[name](options) for name in wanted if name != "engine"}
    if engine is not None:
        done["engine"] = engine.result()
    return [done[name] for name in wanted]


def failed(checks: Sequence[Check]) -> bool:
    return any(c.status is Status.FAIL for c in checks)


def to_json(checks: Sequence[Check]) -> dict[str, object]:
    return {"ok": not failed(checks), "checks": [asdict(c) for c in checks]}


_STYLE = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "bold red"}


def render_table(checks: Sequence[Check], console: Console) -> None:
    table = Table(title="orch doctor", show_lines=True)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("found", overflow="fold")
    table.add_column("what to do", overflow="fold")
    for c in checks:
        table.add_row(c.name, Text(c.status, _STYLE[c.status]), Text(c.found), Text(c.advice))
    console.print(table)
    counts = {s: sum(c.status is s for c in checks) for s in Status}
    console.print(f"{counts[Status.OK]} ok, {counts[Status.WARN]} to look at, "
                  f"{counts[Status.FAIL]} failed", highlight=False)


# --- settings ----------------------------------------------------------------------------

def check_settings(options: DoctorOptions) -> Check:
    env = options.env
    where = (f"{env.path} and the environment" if env.exists
             else f"the environment (no {env.path})")
    found = (f"worker settings from {where}: host {options.host}, port {options.port}, "
             f"cache {options.cache_dir}, discovery {options.discovery}")
    if env.given and not env.exists:
        return Check("settings", Status.FAIL, f"{env.path} does not exist",
                     "give the env file the worker's service reads (orch worker install "
                     f"writes {DEFAULT_ENV_FILE})")
    if options.settings_problem:
        return Check("settings", Status.FAIL, f"{env.path}: {options.settings_problem}",
                     f"fix these lines in {env.path}; `orch worker --help` lists every "
                     f"setting and its ORCH_WORKER_ variable")
    if env.exists and env.values is None:
        return Check("settings", Status.WARN, f"cannot read {env.path} ({env.problem}); "
                     f"checked instead: {found}", "run sudo orch doctor to check the "
                     "settings the worker's service reads")
    return Check("settings", Status.OK, found)


# --- memory, disk ---------------------------------------------------------------------------

def check_memory(options: DoctorOptions) -> Check:
    mem = memory_info()
    if options.memory_budget_mb:
        budget, why = options.memory_budget_mb << 20, "set by ORCH_WORKER_MEMORY_BUDGET_MB"
    else:
        budget = default_budget(mem.available, options.memory_reserve_mb)
        why = f"available minus the {options.memory_reserve_mb} MiB reserve"
    found = (f"total {_size(mem.total)}, available {_size(mem.available)}; a worker would get "
             f"a budget of {_size(budget)} ({why})")
    if options.memory_budget_mb and budget > mem.available:
        return Check("memory", Status.WARN, found + "; the budget is above the RAM available",
                     "lower ORCH_WORKER_MEMORY_BUDGET_MB, or the planner may give this "
                     "machine layers it cannot hold without swapping")
    if budget < MEMORY_WARN_BYTES:
        return Check("memory", Status.WARN, found,
                     "room for very little: close other programs, lower "
                     "ORCH_WORKER_MEMORY_RESERVE_MB, or use this machine as an orchestrator")
    return Check("memory", Status.OK, found)


def disk_status(free: int, total: int) -> Status:
    """Fail when nearly full (< 1 GiB or < 5% free), warn below 4 GiB."""
    if free < DISK_FAIL_BYTES or free < DISK_FAIL_FRACTION * total:
        return Status.FAIL
    return Status.WARN if free < DISK_WARN_BYTES else Status.OK


def check_disk(options: DoctorOptions) -> Check:
    where = _existing(options.cache_dir)
    usage = shutil.disk_usage(where)
    status = disk_status(usage.free, usage.total)
    limit = (f"{options.cache_max_mb} MiB" if options.cache_max_mb
             else f"half the free disk, {_size(usage.free // 2)}")
    found = (f"{options.cache_dir}: {_size(usage.free)} free of {_size(usage.total)} "
             f"({100 * usage.free / max(usage.total, 1):.0f}%); the shard cache may use {limit}")
    if not os.access(where, os.W_OK):
        return Check("disk", Status.FAIL, f"{found}; {where} is not writable by this user",
                     "give the worker's user the folder (chown), or set "
                     "ORCH_WORKER_CACHE_DIR / --cache-dir to one it owns")
    advice = {Status.OK: "",
              Status.WARN: "room for small models only: free space, or move the cache "
                           "(ORCH_WORKER_CACHE_DIR, --cache-dir) to a larger disk",
              Status.FAIL: "the disk is nearly full: free space (orch rm MODEL removes "
                           "pulled models), or move the cache with ORCH_WORKER_CACHE_DIR "
                           "(--cache-dir) to a larger disk"}[status]
    return Check("disk", status, found, advice)


def _existing(path: Path) -> Path:
    """``path``, or its nearest parent that exists (the cache is made on first use)."""
    path = path.expanduser().absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


# --- the token -----------------------------------------------------------------------------

def check_token(options: DoctorOptions) -> Check:
    env = options.env
    tokens = {}  # where -> token
    if env.values and env.values.get("ORCH_WORKER_TOKEN"):
        tokens[f"ORCH_WORKER_TOKEN in {env.path}"] = env.values["ORCH_WORKER_TOKEN"]
    for var, value in options.env_tokens.items():
        tokens[f"${var}"] = value
    file_holds_it = env.exists and (env.values is None or "ORCH_WORKER_TOKEN" in env.values)
    if file_holds_it and env.mode is not None and env.mode & 0o077:
        return Check("token", Status.FAIL, f"{env.path} is mode {env.mode:04o}: other users "
                     f"can read{' or change' if env.mode & 0o022 else ''} the token",
                     f"chmod 600 {env.path} (owned by the user the worker runs as)")
    loopback = clustertoken.is_loopback(options.host)
    if not tokens:
        if env.exists and env.values is None:
            return Check("token", Status.WARN, f"cannot read {env.path} as this user "
                         f"({env.problem}), so its token is not checked",
                         "run sudo orch doctor to check the token it holds")
        return Check("token", Status.WARN if loopback else Status.FAIL,
                     "no cluster token (ORCH_WORKER_TOKEN, ORCH_TOKEN, or in "
                     f"{env.path}): a worker here serves anyone who reaches its port",
                     _TOKEN_HELP.format(env=env.path))
    found = ", ".join(tokens)
    if env.exists and env.mode is not None:
        found += f"; {env.path} is mode {env.mode:04o}"
    if len(set(tokens.values())) > 1:
        return Check("token", Status.WARN, f"the tokens differ: {found}",
                     "use one token everywhere: an orchestrator and a worker with different "
                     "tokens do not see each other as one cluster")
    where, token = next(iter(tokens.items()))
    judgement = clustertoken.judge(token, loopback=loopback)
    if judgement.verdict is not clustertoken.Verdict.OK:
        status = Status.WARN if judgement.verdict is clustertoken.Verdict.WARN else Status.FAIL
        return Check("token", status, f"{where}: {judgement.problem} ({found})",
                     _TOKEN_HELP.format(env=env.path))
    return Check("token", Status.OK, f"set: {found}")


# --- the clock -----------------------------------------------------------------------------

_TIME_ERROR = 5  # adjtimex's clock state when unsynchronised
_STA_UNSYNC = 0x0040


class _Timex(ctypes.Structure):
    """``struct timex`` of <sys/timex.h> (Linux); the tail is padding we never read."""

    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long),
                ("status", ctypes.c_int), ("_rest", ctypes.c_byte * 256)]


def clock_synced() -> tuple[bool | None, str]:
    """(synchronised?, how we know); None when nothing here can tell."""
    if shutil.which("timedatectl"):
        try:
            done = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
                                  capture_output=True, text=True, timeout=3)
        except (OSError, subprocess.TimeoutExpired):
            done = None
        if done is not None and done.returncode == 0 and done.stdout.strip() in ("yes", "no"):
            return done.stdout.strip() == "yes", "timedatectl"
    if Path("/run/systemd/timesync/synchronized").exists():
        return True, "systemd-timesyncd"
    if sys.platform == "linux":
        timex = _Timex()  # modes 0: read only, no privilege needed
        state = ctypes.CDLL(None, use_errno=True).adjtimex(ctypes.byref(timex))
        if state >= 0:
            synced = state != _TIME_ERROR and not timex.status & _STA_UNSYNC
            return synced, "adjtimex"
    return None, ""


def check_time(options: DoctorOptions) -> Check:
    synced, source = clock_synced()
    if synced:
        return Check("time", Status.OK, f"the clock is synchronised ({source})")
    if synced is None:
        return Check("time", Status.WARN, "unknown: nothing here says whether the clock is "
                     "synchronised", "make sure an NTP client runs (systemd-timesyncd, "
                     "chrony or ntpd)")
    return Check("time", Status.WARN, f"the clock is not synchronised ({source})",
                 "enable NTP: sudo timedatectl set-ntp true (or install chrony). A Raspberry "
                 "Pi has no battery clock: with a wrong date, HTTPS model fetches fail "
                 "('certificate is not yet valid')")


CHECKS: Mapping[str, Callable[[DoctorOptions], Check]] = {
    "settings": check_settings,
    "engine": lambda options: _EngineRun().result(),  # run_checks starts it first
    "cpu": check_cpu,
    "memory": check_memory,
    "disk": check_disk,
    "port": check_port,
    "multicast": check_multicast,
    "token": check_token,
    "time": check_time,
}
