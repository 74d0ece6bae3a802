"""Where orch keeps what it fetches and makes: one cache root for every process."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$ORCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/orch``, else ``~/.cache/orch``."""
    if explicit := os.environ.get("ORCH_CACHE_DIR"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "orch"
    return Path.home() / ".cache" / "orch"
