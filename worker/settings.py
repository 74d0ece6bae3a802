"""Settings of one worker process: flags of ``orch worker`` and ``ORCH_WORKER_*`` variables.

One class is the single source of truth: the CLI builds its flags from these fields, and
every flag also reads its ``ORCH_WORKER_<NAME>`` variable (listed by ``--help``).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchcore.errors import InvalidSettingError
from orchcore.memory import DEFAULT_RESERVE_MB, MIB, PROCESS_BASELINE_BYTES, default_budget
from orchcore.paths import cache_dir


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORCH_WORKER_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for the LAN).")
    port: int = Field(50151, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    cache_dir: Path | None = Field(
        None, validate_default=True,
        description="Where received shards are kept, by sha256; unset = shards/ in "
                    "$CACHE_DIRECTORY (systemd's CacheDirectory=), else in orch's cache "
                    "(~/.cache/orch, or $ORCH_CACHE_DIR).")
    state_dir: Path | None = Field(
        None, validate_default=True,
        description="Where the worker keeps its id; unset = $STATE_DIRECTORY (systemd's "
                    "StateDirectory=), else the shard cache folder.")
    cache_max_mb: int = Field(0, ge=0, description="Most disk the shard cache may use, in "
                                                   "MiB; 0 = half the free disk at start. "
                                                   "Least recently used shards go first.")
    threads: int = Field(0, ge=0, le=1024, description="llama.cpp threads; 0 = all cores.")
    memory_budget_mb: int = Field(
        0, ge=0, description="Most memory this whole worker process may use, in MiB "
                             "(weights, KV cache, buffers, interpreter); 0 = the RAM "
                             "available at start minus --memory-reserve-mb.")
    memory_reserve_mb: int = Field(
        DEFAULT_RESERVE_MB, ge=0,
        description="With no budget set: RAM left to the rest of the machine, in MiB.")
    token: SecretStr | None = Field(
        None, description="Cluster token; every call must carry it. Prefer the "
                          "ORCH_WORKER_TOKEN variable: command lines are visible to other "
                          "users. Unset = no auth (only for loopback).")
    token_grace_s: float = Field(
        600.0, ge=0, le=86400, description="After a token rotation (orch rotate-token), how "
                                           "long the previous token is still accepted.")
    max_message_mb: int = Field(64, ge=1, le=1024,
                                description="Largest gRPC message accepted, in MiB.")
    discovery: str = Field(
        "auto", description="Announce this worker with zeroconf: auto (the LAN interfaces "
                            "it listens on, never containers or bridges), off, or an "
                            "interface name (eth0, wlan0, lo).")
    parent_pid: int | None = Field(
        None, ge=1, description="Stop when this process exits (orch run sets it for the "
                                "local workers it starts).")
    plaintext: bool = Field(
        False, description="Serve without TLS, and accept other workers that do. Only on a "
                           "network you trust: the token and all data then cross it in the "
                           "clear. (Links to loopback addresses accept plaintext anyway.)")
    spin_ms: float = Field(
        0.0, ge=0, le=100,
        description="After a chunk, keep this stage's core busy up to this long waiting for "
                    "the next one, instead of letting it go idle (an idle core is slow to "
                    "resume). Costs CPU; see docs/benchmarks.md.")
    ready_file: Path | None = Field(
        None, description="Write 'host:port' here once serving (for supervisors and tests).")
    watchdog_floor_s: float = Field(
        30.0, gt=0, le=3600,
        description="Under systemd's watchdog (WatchdogSec=), the shortest timeout the "
                    "worker accepts, in seconds: a shorter one is raised to this, so that a "
                    "busy machine answering its own health check late is not restarted.")

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir(cls, value: Path | None) -> Path:
        if value is not None:
            return value
        if systemd := _systemd_directory("CACHE_DIRECTORY"):
            return systemd / "shards"
        return cache_dir() / "shards"

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None:
            return value
        return _systemd_directory("STATE_DIRECTORY") or info.data.get("cache_dir")

    def engine_threads(self, cores: int) -> int:
        """The llama.cpp threads a stage runs with here: ``threads``, at most ``cores``."""
        return min(self.threads or cores, cores)

    def budget_bytes(self, available_bytes: int) -> int:
        """The memory budget in bytes, given the RAM available now."""
        if self.memory_budget_mb:
            return self.memory_budget_mb << 20
        return default_budget(available_bytes, self.memory_reserve_mb)


def fit_to_machine(settings: WorkerSettings, ram_bytes: int, cores: int,
                   baseline_bytes: int = 0) -> list[str]:
    """``settings`` held to this machine (``ram_bytes`` of RAM, ``cores`` usable, a process
    that holds ``baseline_bytes`` with nothing loaded: measured, 0 = unknown): a memory
    budget below that baseline or above the RAM is refused (``InvalidSettingError``); more
    threads than cores are warned about. Returns the warnings."""
    low = -(-(baseline_bytes or PROCESS_BASELINE_BYTES) // MIB)
    budget, high = settings.memory_budget_mb, ram_bytes // MIB
    if budget and not low <= budget <= high:
        raise InvalidSettingError(
            f"--memory-budget-mb {budget} (ORCH_WORKER_MEMORY_BUDGET_MB): give {low}..{high} "
            f"MiB (this worker process holds {low} MiB with nothing loaded; this machine "
            f"has {high} MiB of RAM), or 0 for the RAM available at start")
    if settings.threads > cores:
        return [f"--threads {settings.threads} (ORCH_WORKER_THREADS) is more than the {cores} "
                f"cores this worker may use: llama.cpp's threads would take turns on them; "
                f"0 uses every core"]
    return []


def _systemd_directory(variable: str) -> Path | None:
    """The first folder systemd gives a service in ``variable`` (a ':'-separated list)."""
    value = os.environ.get(variable, "").split(":")[0]
    return Path(value) if value else None


for _name, _field in WorkerSettings.model_fields.items():  # `orch worker --help` names them
    _field.description = f"{_field.description} Env: ORCH_WORKER_{_name.upper()}."
