"""Where orch keeps what it fetches and makes: one cache root for every process."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class PathSettings(BaseSettings):
    """orch's own variable for the cache root (read when asked, never at import)."""

    model_config = SettingsConfigDict(env_prefix="ORCH_", extra="ignore")
    cache_dir: str | None = Field(
        None, description="orch's cache root; unset or empty = $XDG_CACHE_HOME/orch, else "
                          "~/.cache/orch.")


def cache_dir() -> Path:
    """``$ORCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/orch``, else ``~/.cache/orch``."""
    if explicit := PathSettings().cache_dir:
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "orch"
    return Path.home() / ".cache" / "orch"
