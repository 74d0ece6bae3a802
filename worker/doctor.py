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
import enum
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ifaddr
import psutil
from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console
from rich.table import Table
from rich.text import Text
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from orchcore import clustertoken
from orchcore.cpu import cpu_info, memory_info, use_extra_buffer_types
from orchcore.discovery import interface_addresses
from orchcore.errors import InvalidSettingError, OrchError, describe_validation
from orchcore.memory import MIB, PROCESS_BASELINE_BYTES, default_budget
from orchcore.wire.channel import Trust, connect
from orchcore.wire.tls import short
from worker.units import parse_env

DEFAULT_ENV_FILE = Path("/etc/orch/worker.env")  # what the worker's systemd unit reads
GIB = 1 << 30
DISK_FAIL_BYTES = 1 * GIB  # less free than this (or DISK_FAIL_FRACTION) fails
DISK_FAIL_FRACTION = 0.05
DISK_WARN_BYTES = 4 * GIB  # room for the shards of small models only
MEMORY_WARN_BYTES = PROCESS_BASELINE_BYTES + 256 * MIB  # a worker with room for little
ENGINE_TIMEOUT_S = 60.0  # importing llama.cpp on a slow SD card takes seconds
PROVE_DEADLINE_S = 1.5
TEST_SERVICE_TYPE = "_orch-doctor._tcp.local."  # not the workers' type: nobody browses it
_TOKEN_HELP = (f"{clustertoken.ADVICE}, and give every worker the same one as "
               f"ORCH_WORKER_TOKEN in {{env}} (chmod 600), and the orchestrator as ORCH_TOKEN")


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    found: str  # what the check saw
    advice: str = ""  # what to do; empty when nothing


@dataclass(frozen=True)
class EnvFile:
    """An env file (``KEY=VALUE`` lines) as a service would read it, without raising."""

    path: Path
    given: bool  # named by --env-file (else the default location, which may be absent)
    exists: bool
    mode: int | None = None  # permission bits
    values: Mapping[str, str] | None = None  # None: absent or unreadable
    problem: str = ""  # why it could not be read

    @classmethod
    def read(cls, path: Path, *, given: bool) -> EnvFile:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            return cls(path, given, exists=False)
        except OSError as exc:
            return cls(path, given, exists=True, problem=exc.strerror or str(exc))
        try:
            text = path.read_text()
        except OSError as exc:
            return cls(path, given, exists=True, mode=mode, problem=exc.strerror or str(exc))
        return cls(path, given, exists=True, mode=mode, values=parse_env(text))

    def worker_values(self) -> dict[str, str]:
        """``ORCH_WORKER_<NAME>`` entries as ``{name: value}``."""
        prefix = "ORCH_WORKER_"
        return {k.removeprefix(prefix).lower(): v for k, v in (self.values or {}).items()
                if k.startswith(prefix)}


@dataclass(frozen=True)
class DoctorOptions:
    """The worker settings this machine would run with, and how long to listen."""

    host: str
    port: int
    cache_dir: Path
    cache_max_mb: int
    discovery: str
    memory_budget_mb: int
    memory_reserve_mb: int
    env: EnvFile
    settings_problem: str = ""  # the env file's worker settings, if invalid
    # Cluster tokens set in this environment, by variable (ORCH_WORKER_TOKEN, ORCH_TOKEN).
    env_tokens: Mapping[str, str] = field(default_factory=dict)
    multicast_timeout_s: float = 3.0
    only: frozenset[str] | None = None  # run only these checks (tests); None = all


def doctor_options(settings_type: type[BaseSettings], *, env_file: Path | None = None,
                   port: int | None = None, cache_dir: Path | None = None) -> DoctorOptions:
    """Options from the worker's settings class (``worker.settings.WorkerSettings``): the
    flags given here, then the env file's ``ORCH_WORKER_*`` values, then the environment."""
    env = EnvFile.read(env_file or DEFAULT_ENV_FILE, given=env_file is not None)
    given = {k: v for k, v in (("port", port), ("cache_dir", cache_dir)) if v is not None}
    from_file = env.worker_values()
    unknown = sorted(k for k in from_file if k not in settings_type.model_fields)
    problem = "; ".join(f"ORCH_WORKER_{k.upper()} is not a worker setting" for k in unknown)
    try:
        settings = settings_type(**{k: v for k, v in from_file.items() if k not in unknown},
                                 **given)
    except ValidationError as exc:
        problem = "; ".join(filter(None, (problem, describe_validation(exc))))
        try:
            settings = settings_type(**given)
        except ValidationError as again:
            raise InvalidSettingError(describe_validation(again)) from None
    return DoctorOptions(
        host=settings.host, port=settings.port, cache_dir=settings.cache_dir,
        cache_max_mb=settings.cache_max_mb, discovery=settings.discovery,
        memory_budget_mb=settings.memory_budget_mb,
        memory_reserve_mb=settings.memory_reserve_mb, env=env, settings_problem=problem,
        env_tokens=TokenVariables().given())


class TokenVariables(BaseSettings):
    """The cluster tokens this environment holds: a worker's and an orchestrator's."""

    model_config = SettingsConfigDict(env_prefix="ORCH_", extra="ignore")
    worker_token: SecretStr | None = None
    token: SecretStr | None = None

    def given(self) -> dict[str, str]:
        return {f"ORCH_{name.upper()}": value.get_secret_value()
                for name, value in (("worker_token", self.worker_token), ("token", self.token))
                if value is not None and value.get_secret_value()}


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


# --- the engine, in a child process --------------------------------------------------------

_CHILD = "from worker.doctor import engine_selftest; engine_selftest()"


def engine_selftest() -> None:
    """The child's side of the engine check: a tiny generated model (Q4_0, so llama.cpp's
    repacking runs where it would) evaluates three tokens; prints one JSON line."""
    import tempfile

    import gguf
    import llama_cpp
    import numpy as np

    from orchcore.config import EngineConfig
    from orchcore.cpu import use_extra_buffer_types
    from orchcore.engine import StageEngine
    from orchcore.errors import OrchError
    from orchcore.modelgen import ModelSpec, write_model

    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="orch-doctor-") as tmp:
            path = write_model(Path(tmp) / "doctor.gguf", ModelSpec(
                n_layers=2, weight_type=gguf.GGMLQuantizationType.Q4_0))
            config = EngineConfig(context_tokens=32, max_sessions=1, batch_tokens=4)
            with StageEngine(path, config, label="the doctor's test model") as engine:
                first = engine.forward("doctor", [0, 1], tokens=[1, 300])
                second = engine.forward("doctor", [2], tokens=[int(np.argmax(first[-1]))])
        finite = bool(np.isfinite(first).all() and np.isfinite(second).all())
        report = {"finite": finite, "seconds": time.perf_counter() - start}
    except OrchError as exc:
        report = {"error": str(exc)}
    report.update(llama_cpp=llama_cpp.__version__, extra_buffers=use_extra_buffer_types())
    print(json.dumps(report), flush=True)


class _EngineRun:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def result(self) -> Check:
        advice = ("reinstall orch in its own venv (`pip install -e .` in the checkout builds "
                  "the pinned llama-cpp-python for this CPU), then run orch doctor again")
        try:
            out, err = self.proc.communicate(timeout=ENGINE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return Check("engine", Status.FAIL, f"llama.cpp did not evaluate 3 tokens of a "
                         f"2-layer model in {ENGINE_TIMEOUT_S:.0f} s", advice)
        tail = " | ".join(err.strip().splitlines()[-3:])
        code = self.proc.returncode
        if code < 0:
            name = _signal_name(-code)
            return Check("engine", Status.FAIL, f"llama.cpp crashed ({name}) running a tiny "
                         f"model on this CPU{': ' + tail if tail else ''}",
                         f"{advice}; if it still crashes, report the CPU line of orch doctor")
        try:
            report = json.loads(out.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return Check("engine", Status.FAIL, f"the engine check exited with code {code}: "
                         f"{tail or 'no output'}", advice)
        version = f"llama-cpp-python {report.get('llama_cpp', '?')}"
        if "error" in report or not report.get("finite"):
            return Check("engine", Status.FAIL,
                         f"{version}: {report.get('error') or 'logits are not finite'}", advice)
        wall = time.monotonic() - self.start
        extra = "on" if report.get("extra_buffers") else "off"
        return Check("engine", Status.OK, f"{version} loaded a generated 2-layer Q4_0 model "
                     f"(extra buffer types {extra}) and evaluated 3 tokens in "
                     f"{report['seconds']:.2f} s ({wall:.1f} s with start-up)")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# --- CPU, memory, disk ---------------------------------------------------------------------

def check_cpu(options: DoctorOptions) -> Check:
    info = cpu_info()
    amx = sorted(f for f in info.flags if f.startswith("amx"))
    machine = f"{info.model} ({info.arch}, {info.cores} cores)"
    if not use_extra_buffer_types(info):
        return Check("cpu", Status.OK, f"{machine}; AMX ({', '.join(amx)}): llama.cpp's extra "
                     "buffer types are off, because ggml's AMX kernels crash the pinned "
                     "build on the first decode; weights are memory-mapped instead")
    found = (f"{machine}; no AMX: llama.cpp's extra buffer types are on (weights repacked "
             f"for this CPU, the file read rather than mapped)")
    if info.arch in ("x86_64", "AMD64") and info.flags and "avx2" not in info.flags:
        return Check("cpu", Status.WARN, f"{found}; no AVX2",
                     "llama.cpp is slow without AVX2: the planner gives this machine few "
                     "layers or leaves it as a standby")
    return Check("cpu", Status.OK, found)


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


# --- the worker port -------------------------------------------------------------------------

def check_port(options: DoctorOptions) -> Check:
    host, port = options.host, options.port
    if port == 0:
        return Check("port", Status.OK, "port 0: the worker takes a free port at start and "
                     "announces it")
    problem = _bind_problem(host, port)
    address = f"{host}:{port}"
    if problem is None:
        if clustertoken.is_loopback(host):
            return Check("port", Status.WARN, f"{address} is free, but it is loopback: "
                         "other machines cannot reach a worker here",
                         f"for a cluster, set ORCH_WORKER_HOST=0.0.0.0 in {options.env.path} "
                         f"(or orch worker --host 0.0.0.0)")
        return Check("port", Status.OK, f"{address} is free")
    if problem.errno != errno.EADDRINUSE:
        return Check("port", Status.FAIL, f"cannot listen on {address}: {problem.strerror}",
                     "set ORCH_WORKER_HOST to an address of this machine (0.0.0.0 for all) "
                     "and ORCH_WORKER_PORT to a port above 1023")
    worker = _orch_worker(host, port, _worker_token(options))
    if worker is not None:
        return Check("port", worker[0], f"{address} is taken by an orch worker "
                     f"({worker[1]})", worker[2])
    return Check("port", Status.FAIL, f"{address} is taken{_holder(port)}, not by an orch "
                 "worker", f"stop that program, or give the worker another port: "
                 f"ORCH_WORKER_PORT=... in {options.env.path} (or --port); discovered "
                 "workers announce their port, --workers lists need it")


def _bind_problem(host: str, port: int) -> OSError | None:
    """Why a listener cannot bind ``host:port``, or None. No SO_REUSEPORT: a gRPC server
    holding the port would let us share it."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host or "0.0.0.0", port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        return OSError(errno.EADDRNOTAVAIL, f"{host}: {exc.strerror}")
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not busy
        try:
            sock.bind(sockaddr)
            sock.listen(1)
        except OSError as exc:
            return exc
    return None


def _worker_token(options: DoctorOptions) -> str | None:
    return (options.env.values or {}).get("ORCH_WORKER_TOKEN") or \
        options.env_tokens.get("ORCH_WORKER_TOKEN")


def _orch_worker(host: str, port: int, token: str | None
                 ) -> tuple[Status, str, str] | None:
    """(status, what, advice) when an orch worker answers Prove (the call that needs no
    token) on the port, else None."""
    target = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    target = f"[{target}]" if ":" in target else target
    try:  # loopback: plaintext is accepted too, TLS is checked like anywhere else
        link = connect(f"{target}:{port}", token, allow_plaintext=True,
                       timeout_s=PROVE_DEADLINE_S)
    except OrchError:
        return None
    link.close()
    who = f"id {link.worker_id[:8]}" + (f", TLS certificate {short(link.fingerprint)}"
                                        if link.fingerprint else ", plaintext")
    if link.trust is Trust.NO_TOKEN:
        return Status.WARN, f"{who}, without a token", \
            "restart it with ORCH_WORKER_TOKEN set: it serves anyone who can reach it"
    if token is None:
        return Status.OK, f"{who}, with a token this check cannot compare", ""
    if link.trust is not Trust.PROVEN:
        return Status.WARN, f"{who}, holding another token than ORCH_WORKER_TOKEN here", \
            "restart the worker (or its service) so that it reads the current token"
    return Status.OK, f"{who}, holding this machine's token: it is running", ""


def _holder(port: int) -> str:
    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and \
                    conn.laddr.port == port and conn.pid:
                return f" by {psutil.Process(conn.pid).name()} (pid {conn.pid})"
    except (psutil.Error, OSError):
        pass  # other users' sockets are not ours to see
    return ""


# --- multicast -----------------------------------------------------------------------------

def check_multicast(options: DoctorOptions) -> Check:
    if options.discovery == "off":
        return Check("multicast", Status.WARN, "not checked: discovery is off "
                     "(ORCH_WORKER_DISCOVERY=off)", "orchestrators find this worker only "
                     "when listed: orch run --workers HOST:PORT")
    try:
        addresses = interface_addresses(options.discovery)
    except InvalidSettingError as exc:
        return Check("multicast", Status.FAIL, str(exc),
                     "set ORCH_WORKER_DISCOVERY to auto or one of the names listed")
    if not addresses:
        return Check("multicast", Status.WARN, "no interface to announce workers on (auto "
                     "skips loopback, containers, bridges and VPN tunnels)",
                     "join the LAN (Ethernet or Wi-Fi), or name an interface with "
                     "ORCH_WORKER_DISCOVERY; without one, list workers: orch run --workers "
                     "HOST:PORT")
    where = f"{_interface_names(addresses)} ({', '.join(addresses)})"
    try:
        seen = _sees_itself(addresses, options.multicast_timeout_s)
    except OSError as exc:
        return Check("multicast", Status.WARN, f"cannot open mDNS sockets on {where}: {exc}",
                     "another program may hold UDP 5353 exclusively, or the interface "
                     "has no multicast; list workers with --workers HOST:PORT meanwhile")
    if seen is None:
        return Check("multicast", Status.WARN, f"a test service announced on {where} was not "
                     f"seen within {options.multicast_timeout_s:.0f} s",
                     "discovery will not find workers: allow multicast (UDP 5353, mDNS) in "
                     "the firewall and on the Wi-Fi (some routers block it: 'client isolation'"
                     ", 'multicast filtering'), or list workers with --workers HOST:PORT")
    return Check("multicast", Status.OK, f"a test service announced on {where} came back in "
                 f"{seen:.1f} s")


def _sees_itself(addresses: list[str], timeout_s: float) -> float | None:
    """Seconds until a second zeroconf instance saw our test service, or None."""
    label = f"doctor-{secrets.token_hex(4)}"
    info = ServiceInfo(TEST_SERVICE_TYPE, f"{label}.{TEST_SERVICE_TYPE}",
                       addresses=[socket.inet_aton(ip) for ip in addresses], port=9,
                       properties={}, server=f"{label}.local.")
    seen = threading.Event()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:
        if name == info.name and state_change is ServiceStateChange.Added:
            seen.set()

    start = time.monotonic()
    with ExitStack() as stack:  # undone in reverse: unregister, stop browsing, close
        announcer = Zeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
        stack.callback(announcer.close)
        listener = Zeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
        stack.callback(listener.close)
        stack.callback(ServiceBrowser(listener, TEST_SERVICE_TYPE, handlers=[on_change]).cancel)
        announcer.register_service(info)
        stack.callback(announcer.unregister_service, info)
        return time.monotonic() - start if seen.wait(timeout_s) else None


def _interface_names(addresses: list[str]) -> str:
    names = sorted({a.nice_name for a in ifaddr.get_adapters()
                    for ip in a.ips if ip.ip in addresses})
    return ", ".join(names) or "?"


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
