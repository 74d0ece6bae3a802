"""Every ORCH_* variable the product reads goes through a settings class (pydantic-settings),
where its name, default and meaning are written once; HF_*, XDG_* and systemd's variables
are read where they are used."""

from __future__ import annotations

import re
from pathlib import Path

from orchcore.paths import cache_dir
from orchestrator.models.registry import registry_path

ROOT = Path(__file__).resolve().parent.parent
_DIRECT = re.compile(r"(environ\b[^\n]*|getenv\([^\n]*)[\"']ORCH_")


def test_no_orch_variable_is_read_from_the_environment_directly():
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for package in ("orchcore", "orchestrator", "worker")
             for path in sorted((ROOT / package).rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if _DIRECT.search(line) and "dict(os.environ" not in line]
    assert not found, "read ORCH_* through a settings class:\n" + "\n".join(found)


def test_the_cache_root_and_the_registry_file_follow_their_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.setenv("ORCH_CACHE_DIR", "")  # empty: as if unset
    assert cache_dir() == tmp_path / "xdg" / "orch"
    monkeypatch.setenv("ORCH_MODELS_FILE", "~/models.yaml")
    assert registry_path() == Path.home() / "models.yaml"
    monkeypatch.delenv("ORCH_MODELS_FILE")
    assert registry_path().name == "models.yaml" and registry_path().is_file()
