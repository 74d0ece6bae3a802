"""What ``orch doctor`` checks against and what a check says: the options (the worker settings
this machine would run with, and the env file a service reads) and one ``Check`` per subject."""

from __future__ import annotations

import enum
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchcore import clustertoken
from orchcore.errors import InvalidSettingError, describe_validation
from orchcore.memory import MIB, PROCESS_BASELINE_BYTES
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
    variables = {name: f"ORCH_WORKER_{name.upper()}" for name in settings_type.model_fields}
    try:
        settings = settings_type(**{k: v for k, v in from_file.items() if k not in unknown},
                                 **given)
    except ValidationError as exc:
        problem = "; ".join(filter(None, (problem, describe_validation(exc, variables))))
        try:
            settings = settings_type(**given)
        except ValidationError as again:
            raise InvalidSettingError(describe_validation(again, variables)) from None
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


