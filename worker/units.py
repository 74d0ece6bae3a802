"""The worker as a systemd service, as text: its unit, its settings file, its memory limit.

Pure: values in, file contents out. ``worker/install.py`` writes them and runs systemctl.
The unit's directives carry their reasons as comments (docs/services.md explains them
too); ``deploy/systemd/orch-worker.service`` is this unit rendered for ``/opt/orch`` and a
3 GiB budget, kept equal to the renderer by a test.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from dataclasses import dataclass

import dotenv
from dotenv.parser import parse_stream

from orchcore import clustertoken
from orchcore.errors import InvalidSettingError

UNIT_NAME = "orch-worker.service"
ENV_FILE = "etc/orch/worker.env"  # under the root; systemd reads it as root, mode 0600
UNIT_FILE = f"etc/systemd/system/{UNIT_NAME}"
STATE_DIRS = ("var/lib/orch", "var/lib/private/orch")  # StateDirectory= with DynamicUser=
CACHE_DIRS = ("var/cache/orch", "var/cache/private/orch")  # CacheDirectory= likewise
DEFAULT_EXEC = "/opt/orch/bin/orch"
DEFAULT_PORT = 50151
# What the unit may use beyond the worker's own budget (see memory_max_mb).
MEMORY_MARGIN_MIN_MB = 256
MEMORY_MARGIN_FRACTION = 4  # a quarter of the budget

# The variables the installer owns in the env file (WorkerSettings reads them); any other
# line a user added there is kept as it is.
TOKEN, HOST, PORT, BUDGET, CACHE_MAX = (
    "ORCH_WORKER_TOKEN", "ORCH_WORKER_HOST", "ORCH_WORKER_PORT",
    "ORCH_WORKER_MEMORY_BUDGET_MB", "ORCH_WORKER_CACHE_MAX_MB")


@dataclass(frozen=True)
class WorkerConfig:
    """What the env file says: the installer's variables, and the lines it keeps."""
    token: str
    port: int
    budget_mb: int
    cache_max_mb: int
    host: str = "0.0.0.0"
    kept: tuple[str, ...] = ()  # other lines of an earlier env file, verbatim

    def __post_init__(self) -> None:
        clustertoken.require(self.token, loopback=clustertoken.is_loopback(self.host),
                             source="--token")
        if not 1 <= self.port <= 65535:
            raise InvalidSettingError(f"--port {self.port}: a service needs a fixed port in "
                                      f"1..65535 (orchestrators may list it)")
        if self.budget_mb < 1:
            raise InvalidSettingError(f"--budget-mb {self.budget_mb}: give the MiB this "
                                      f"worker may use, at least 1")
        if self.cache_max_mb < 0:
            raise InvalidSettingError(f"--cache-max-mb {self.cache_max_mb}: 0 (half the "
                                      f"free disk) or more")


def parse_env(text: str) -> dict[str, str]:
    """The assignments of an env file, as systemd's ``EnvironmentFile=`` reads them (one
    ``NAME=value`` a line, ``#`` comments, quotes, no expansion). The one reader of env
    files: the installer and ``orch doctor`` both use it."""
    values = dotenv.dotenv_values(stream=io.StringIO(text), interpolate=False)
    return {key: value for key, value in values.items() if value is not None}


def kept_lines(text: str) -> tuple[str, ...]:
    """The assignments of an earlier env file that the installer does not own, verbatim."""
    ours = {TOKEN, HOST, PORT, BUDGET, CACHE_MAX}
    return tuple(binding.original.string.rstrip("\n")
                 for binding in parse_stream(io.StringIO(text))
                 if binding.key is not None and binding.key not in ours)


def render_env(config: WorkerConfig) -> str:
    lines = [
        "# orch worker settings, read by orch-worker.service (written by `orch worker "
        "install`;",
        "# edit, then: systemctl restart orch-worker). Mode 0600: it holds the cluster token.",
        "# Any ORCH_WORKER_* variable of `orch worker --help` may be added; it is kept on "
        "upgrade.",
        f"{TOKEN}={config.token}",
        f"{HOST}={config.host}",
        f"{PORT}={config.port}",
        "# Whole-process memory budget in MiB; MemoryMax= of the unit is derived from it.",
        f"{BUDGET}={config.budget_mb}",
        "# Most disk for received shards, in MiB; 0 = half the free disk at start.",
        f"{CACHE_MAX}={config.cache_max_mb}",
        *config.kept,
    ]
    return "\n".join(lines) + "\n"


def memory_max_mb(budget_mb: int) -> int:
    """The cgroup's hard limit for a worker with this budget: the budget plus a margin of a
    quarter (at least 256 MiB).

    The budget is the worker's own admission figure: it refuses a shard whose estimate
    exceeds it (``MemoryBudgetError``), and the estimate is tested against the peak RSS of
    real workers. The cgroup counts more than that RSS: page cache of shard files being
    received or cut while another shard is loaded, socket buffers, kernel memory, and the
    estimate's own error. MemoryMax is the backstop for a runaway (a leak, a bug), not the
    budget itself: at the budget exactly, legitimate bursts would end in the OOM killer.
    """
    return budget_mb + max(MEMORY_MARGIN_MIN_MB, budget_mb // MEMORY_MARGIN_FRACTION)


def exec_path_for_unit(path: str) -> str:
    """``path`` as an ExecStart= command: absolute, with no characters systemd would read
    as quoting or specifiers (``%`` is escaped)."""
    if not path.startswith("/") or re.search(r"[\s\"'\\;$]", path):
        raise InvalidSettingError(f"cannot run {path!r} from a unit: install orch at a plain "
                                  f"absolute path (e.g. {DEFAULT_EXEC})")
    return path.replace("%", "%%")


def render_worker_unit(exec_path: str, budget_mb: int) -> str:
    """The unit of ``orch worker`` run from ``exec_path``, limited for ``budget_mb``."""
    return _WORKER_UNIT.format(exec=exec_path_for_unit(exec_path), budget=budget_mb,
                               memory_max=memory_max_mb(budget_mb),
                               margin=memory_max_mb(budget_mb) - budget_mb)


def describe_values(values: Mapping[str, str]) -> str:
    """The installer's variables of an env file, the token hidden."""
    return ", ".join(f"{key}={'(set)' if key == TOKEN else value}"
                     for key, value in values.items() if key in (TOKEN, PORT, BUDGET, CACHE_MAX))


_WORKER_UNIT = """\
# orch worker: serves one stage of a GGUF model over gRPC to the orchestrators of this home.
# Written by `orch worker install` (docs/services.md); its settings live in
# /etc/orch/worker.env. Upgrading: run `orch worker install` again (token, id and cache kept).
# Each directive says why it is here. Checked on the build machine: `systemd-analyze verify`,
# `systemd-analyze security` (exposure at most 4.0), and the worker serving under a sandbox
# with the same file-system view, address families, capabilities and no-new-privileges
# (tests/test_systemd.py, tests/test_sandbox.py); the rest only on a host booted with systemd.

[Unit]
Description=orch worker (one stage of a GGUF model over gRPC)
# Bind and announce (zeroconf) on the LAN only once it has addresses.
Wants=network-online.target
After=network-online.target

[Service]
# The worker sends READY=1 once its gRPC server answers itself and it is advertised,
# STATUS= as its loaded layers and sessions change, STOPPING=1 on the way out.
Type=notify
# Notifications come from the worker's own process (any of its threads), nothing else.
NotifyAccess=main
ExecStart={exec} worker
# ORCH_WORKER_* settings: token, host, port, memory budget, cache size (mode 0600, root's).
EnvironmentFile=/etc/orch/worker.env
# Anything that asks for orch's cache outside the shard folder lands in CacheDirectory=.
Environment=ORCH_CACHE_DIR=%C/orch
# Importing llama.cpp from an SD card can take a while on a Raspberry Pi.
TimeoutStartSec=180
# Fed every third of this by a thread that pings the worker's own gRPC server: a long
# prefill computes on another thread and does not starve it, a wedged server does (two
# failed checks, then systemd kills it and Restart= starts it again).
WatchdogSec=90
# SIGTERM: the worker stops serving, unloads and exits within seconds.
TimeoutStopSec=30
# A crash, a watchdog kill or an OOM kill is followed by a fresh start.
Restart=on-failure
RestartSec=5

# A user made for the service at each start: it owns nothing outside StateDirectory= and
# CacheDirectory=, has no login, and vanishes with the service (no account to manage).
DynamicUser=yes
# /var/lib/orch: the worker id (kept across upgrades and restarts).
StateDirectory=orch
# /var/cache/orch: received shards and probe timings (kept unless uninstalled with --purge).
CacheDirectory=orch
StateDirectoryMode=0700
CacheDirectoryMode=0700
UMask=0077

# Memory: the worker refuses shards beyond its budget ({budget} MiB,
# ORCH_WORKER_MEMORY_BUDGET_MB); this hard limit adds {margin} MiB for what the cgroup counts
# beyond the worker's estimate (page cache of shards being written, socket buffers, kernel
# memory, estimate error). Only a runaway reaches it; the OOM killer then ends the worker.
MemoryMax={memory_max}M

# --- hardening -------------------------------------------------------------------------
# The whole file system read-only, but for the state and cache folders above.
ProtectSystem=strict
# /home, /root and /run/user invisible: the worker reads nothing of any user (install orch
# outside them, e.g. in /opt/orch).
ProtectHome=yes
# A /tmp and /var/tmp of its own, emptied when it stops.
PrivateTmp=yes
# No hardware devices, only /dev/null, zero, random and the like: the worker computes on the CPU.
PrivateDevices=yes
# Neither it nor anything it could run may gain privileges (setuid binaries, file caps).
NoNewPrivileges=yes
# No capabilities at all: the default port is above 1024, nothing else needs one.
CapabilityBoundingSet=
AmbientCapabilities=
# Sockets: IPv4 and IPv6 (gRPC, zeroconf multicast), AF_UNIX (systemd's notify socket),
# AF_NETLINK (the interface list zeroconf announces on). No raw or packet sockets.
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
# The system calls of an ordinary service; privileged ones (mount, reboot, module loading,
# swap, clock, raw I/O...) fail with EPERM instead of killing the worker. @resources stays
# allowed: llama.cpp may set its threads' CPU affinity and memory policy.
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
SystemCallArchitectures=native
# No new namespaces, realtime scheduling, setuid/setgid files or personality changes.
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# Kernel tunables, modules, logs, the cgroup tree, the clock and the host name: read-only
# or out of reach (the worker reads /proc/cpuinfo, /proc/meminfo and the boot id only).
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# Other users' processes are invisible in /proc. Not ProcSubset=pid: the worker's Info
# reads /proc/cpuinfo and /proc/meminfo.
ProtectProc=invisible
# Its own System V IPC, keyring and mount table.
RemoveIPC=yes
KeyringMode=private
PrivateMounts=yes
# Not PrivateNetwork= nor IPAddressDeny=: it serves the LAN, and fetches its own slice of a
# model from where the model is published (a hub, a URL).
# Not MemoryDenyWriteExecute=: the engine's graph tap is a ctypes callback, and libffi
# closures need memory that is writable and executable.

[Install]
WantedBy=multi-user.target
"""
