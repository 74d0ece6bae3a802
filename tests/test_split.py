"""gguf-split sets (``NAME-00001-of-00006.gguf`` ...) are read as one model.

The same generated model is written as one file and as a set of six files whose boundaries
fall inside layers. Its facts, its shards (sha256) and the logits of a chain cut from it
equal those of the single file; broken sets give typed errors that say what to do.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from orchcore.errors import CorruptGGUFError, TruncatedGGUFError, UnsupportedModelError
from orchcore.facts import SPLIT_KEYS, ModelFacts, read_model_facts, split_part_paths
from orchcore.modelgen import preset, write_model
from orchcore.shard import LayerRange, ranges_from_cuts, write_shard
from testkit.chain import assert_chain_exact
from testkit.reference import ReferenceModel

# Untied, so the lm head is a tensor of its own, in the last file. 39 tensors: the
# embedding, 9 per layer, the norm and the lm head; 7 a file puts every layer across a
# file boundary.
SPEC = preset("tiny-llama-mha-untied")
PER_FILE = 7
N_FILES = 6
PROMPT = [1, 17, 300, 42, 99, 5, 260, 77]
STEPS = 8
CUTS = [[1], [2], [1, 3], [1, 2, 3]]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """``(single file, first file of the set)`` of the same model."""
    folder = tmp_path_factory.mktemp("split")
    models = (write_model(folder / "one.gguf", SPEC),
              write_model(folder / "set.gguf", SPEC, split_max_tensors=PER_FILE))
    assert models[1].name == f"set-00001-of-{N_FILES:05d}.gguf"
    assert not list(folder.glob("*.partial"))
    return models


@pytest.fixture
def copied_set(models, tmp_path) -> list[Path]:
    """A private copy of the set's files, for tests that break it."""
    return [Path(shutil.copy(part, tmp_path)) for part in read_model_facts(models[1]).parts]


# --- names and facts -----------------------------------------------------------------------


def test_part_names_follow_llama_cpp():
    first = Path("/m/Qwen-7B-Q4_K_M-00001-of-00003.gguf")
    assert [p.name for p in split_part_paths(first, 3)] == [
        f"Qwen-7B-Q4_K_M-{no:05d}-of-00003.gguf" for no in (1, 2, 3)]
    assert all(p.parent == first.parent for p in split_part_paths(first, 3))
    assert split_part_paths(Path("/m/model.gguf"), 1) == (Path("/m/model.gguf"),)


@pytest.mark.parametrize("name", ["model.gguf", "m-00002-of-00003.gguf",
                                  "m-00001-of-00004.gguf", "-00001-of-00003.gguf"])
def test_first_part_misnamed(name):
    with pytest.raises(UnsupportedModelError, match=r"-00001-of-00003\.gguf"):
        split_part_paths(Path(name), 3)


def _planning_view(facts: ModelFacts) -> dict:
    """Every fact the planner and the shard layout use, without where bytes lie."""
    return {
        "shape": (facts.arch, facts.n_layers, facts.n_embd, facts.n_head, facts.n_head_kv,
                  facts.head_dim_k, facts.head_dim_v, facts.n_ff, facts.n_ctx_train,
                  facts.n_vocab, facts.tied_output, facts.alignment),
        "bytes": (facts.layer_bytes, facts.embedding_bytes, facts.output_bytes,
                  facts.output_norm_bytes),
        "tensors": [(t.name, t.ggml_type, t.shape, t.n_bytes) for t in facts.tensors],
        "metadata": {k: v for k, v in facts.metadata.items() if k not in SPLIT_KEYS},
    }


def test_set_facts_equal_single_file(models):
    one, first = (read_model_facts(m) for m in models)
    assert _planning_view(one) == _planning_view(first)
    assert one.parts == (one.path,) and {t.part for t in one.tensors} == {0}
    assert first.path == first.parts[0] == models[1]
    assert first.parts == split_part_paths(models[1], N_FILES)
    assert first.file_size == sum(p.stat().st_size for p in first.parts)
    assert [t.part for t in first.tensors] == sorted(t.part for t in first.tensors)
    assert {t.part for t in first.tensors} == set(range(N_FILES))
    for tensor in first.tensors:
        assert tensor.offset + tensor.n_bytes <= first.parts[tensor.part].stat().st_size


def test_tensors_point_at_their_bytes(models):
    one, first = (read_model_facts(m) for m in models)
    for a, b in zip(one.tensors, first.tensors, strict=True):
        with one.path.open("rb") as fa, first.parts[b.part].open("rb") as fb:
            fa.seek(a.offset)
            fb.seek(b.offset)
            assert fa.read(a.n_bytes) == fb.read(b.n_bytes), a.name


# --- shards ----------------------------------------------------------------------------------


def _ranges() -> list[LayerRange]:
    found = {r for cuts in CUTS for r in ranges_from_cuts(SPEC.n_layers, cuts)}
    return sorted(found | {LayerRange(0, SPEC.n_layers)})


@pytest.mark.parametrize("layers", _ranges(), ids=str)
def test_shard_of_set_equals_shard_of_single_file(models, layers, tmp_path):
    one, first = models
    a = write_shard(one, layers, tmp_path / "from-one.gguf")
    b = write_shard(first, layers, tmp_path / "from-set.gguf")
    assert a.sha256 == b.sha256 and a.size == b.size
    keys = gguf.GGUFReader(b.path).fields
    assert not set(SPLIT_KEYS) & set(keys)


def test_a_stage_reads_several_files(models):
    """The cut tests above really copy layers from more than one file."""
    facts = read_model_facts(models[1])
    assert len({t.part for t in facts.layer_tensors(1)}) > 1


# --- logits ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(models, threads):
    """Greedy tokens and logits of the single file, run whole."""
    model = ReferenceModel(models[0], threads=threads)
    try:
        return model.greedy(PROMPT, STEPS)
    finally:
        model.close()


def test_llama_cpp_reads_the_set_as_the_same_model(models, reference, threads):
    model = ReferenceModel(models[1], threads=threads)
    try:
        generated, logits = model.greedy(PROMPT, STEPS)
    finally:
        model.close()
    assert generated == reference[0]
    assert all(np.array_equal(a, b) for a, b in zip(reference[1], logits, strict=True))


@pytest.mark.parametrize("cuts", CUTS, ids=lambda c: "cut-" + "-".join(map(str, c)))
def test_chain_of_set_equals_single_file(models, reference, cuts, tmp_path, threads):
    generated, expected = reference
    assert_chain_exact(models[1], cuts, tmp_path, threads, PROMPT, generated, expected)


# --- broken sets -----------------------------------------------------------------------------


def test_missing_part_is_named(copied_set):
    first, missing = copied_set[0], copied_set[3]
    read_model_facts(first)  # cached facts must not hide the file's absence
    missing.unlink()
    with pytest.raises(TruncatedGGUFError) as info:
        read_model_facts(first)
    assert info.value.path == missing
    assert missing.name in str(info.value) and f"has {N_FILES} files" in str(info.value)


def test_second_part_given(copied_set):
    with pytest.raises(UnsupportedModelError) as info:
        read_model_facts(copied_set[1])
    message = str(info.value)
    assert f"file 2 of the {N_FILES}" in message and copied_set[0].name in message, message


def test_parts_swapped(copied_set):
    second, third = copied_set[1], copied_set[2]
    swap = second.with_name("swap")
    second.rename(swap)
    third.rename(second)
    swap.rename(third)
    with pytest.raises(CorruptGGUFError, match="header says file 3 of 6"):
        read_model_facts(copied_set[0])


def test_changed_part_is_read_again(copied_set):
    """The facts cache keys on every file: a later file cut short after a read is noticed."""
    first, last = copied_set[0], copied_set[-1]
    read_model_facts(first)
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(TruncatedGGUFError, match=r"output\.weight") as info:
        read_model_facts(first)
    assert info.value.path == last
