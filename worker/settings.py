"""Settings of one worker process: flags of ``orch worker`` and ``ORCH_WORKER_*`` variables.

One class is the single source of truth: the CLI builds its flags from these fields.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    from orchestrator.modelstore import cache_dir

    return cache_dir() / "shards"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORCH_WORKER_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for the LAN).")
    port: int = Field(50151, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    cache_dir: Path = Field(default_factory=_default_cache_dir,
                            description="Where received shards are kept, by sha256.")
    threads: int = Field(0, ge=0, le=1024, description="llama.cpp threads; 0 = all cores.")
    memory_budget_mb: int = Field(
        0, ge=0, description="Most memory shards + KV caches may use, in MiB; 0 = the RAM "
                             "available at start minus 512 MiB.")
    token: SecretStr | None = Field(
        None, description="Cluster token; every call must carry it. Prefer the "
                          "ORCH_WORKER_TOKEN variable: command lines are visible to other "
                          "users. Unset = no auth (only for loopback).")
    max_message_mb: int = Field(64, ge=1, le=1024,
                                description="Largest gRPC message accepted, in MiB.")
    ready_file: Path | None = Field(
        None, description="Write 'host:port' here once serving (for supervisors and tests).")
