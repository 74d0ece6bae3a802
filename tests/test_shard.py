"""Shards: layer-range arithmetic, and the bytes ``write_shard`` puts in a shard file.

The files are read back with gguf-py's own reader and compared byte for byte with the
source model's tensors; memory and crash behaviour of the writer are measured on
generated models of different sizes.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from itertools import pairwise
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import Keys
from hypothesis import given, settings
from hypothesis import strategies as st

from orchcore.errors import LayerRangeError
from orchcore.facts import TensorFacts, read_model_facts
from orchcore.modelgen import preset
from orchcore.shard import (
    KEY_INPUT_FED,
    KEY_INPUT_OFFSET,
    KEY_INPUT_ROWS,
    KEY_INPUT_TYPE,
    KEY_LAYER_END,
    KEY_LAYER_START,
    KEY_OUTPUT_EMBEDS,
    KEY_SOURCE_LAYERS,
    KEY_SOURCE_VOCAB,
    LayerRange,
    even_ranges,
    ranges_from_cuts,
    shard_layout,
    write_shard,
)
from testkit.models import generated_model

ARCH = "llama"
VOCAB_SIZE = Keys.LLM.VOCAB_SIZE.format(arch=ARCH)
BLOCK_COUNT = Keys.LLM.BLOCK_COUNT.format(arch=ARCH)
RANGES = [(0, 1), (1, 3), (3, 4), (0, 4)]

# --- layer ranges ---------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "end"), [(0, 0), (3, 3), (5, 2), (-1, 2), (-3, -1)])
def test_empty_or_negative_range(start, end):
    with pytest.raises(LayerRangeError, match=rf"\[{start}, {end}\)"):
        LayerRange(start, end)


@pytest.mark.parametrize(("start", "end"), [(0, 5), (3, 9), (4, 5)])
def test_range_outside_model(start, end, tmp_path):
    facts = read_model_facts(generated_model(preset("tiny-llama-gqa"), "m.gguf"))
    with pytest.raises(LayerRangeError) as info:
        shard_layout(facts, LayerRange(start, end))
    message = str(info.value)
    assert f"[{start}, {end})" in message and "[0, 4)" in message, message
    assert isinstance(info.value, ValueError)


def test_range_basics():
    r = LayerRange(3, 7)
    assert len(r) == 4 and str(r) == "[3, 7)"
    assert sorted([LayerRange(5, 6), r, LayerRange(0, 3)])[0] == LayerRange(0, 3)
    r.check_within(7)
    with pytest.raises(LayerRangeError, match=r"\[0, 6\)"):
        r.check_within(6)


def _assert_partition(ranges: tuple[LayerRange, ...], n_layers: int) -> None:
    assert ranges[0].start == 0 and ranges[-1].end == n_layers
    assert all(len(r) >= 1 for r in ranges)
    assert all(a.end == b.start for a, b in pairwise(ranges))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n_layers=st.integers(1, 200))
def test_even_ranges_partition(data, n_layers):
    n_parts = data.draw(st.integers(1, n_layers))
    ranges = even_ranges(n_layers, n_parts)
    assert len(ranges) == n_parts
    _assert_partition(ranges, n_layers)
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1


@given(n_layers=st.integers(1, 50), extra=st.integers(1, 5))
def test_even_ranges_refuses_too_many_parts(n_layers, extra):
    with pytest.raises(LayerRangeError, match=str(n_layers)):
        even_ranges(n_layers, n_layers + extra)
    with pytest.raises(LayerRangeError):
        even_ranges(n_layers, 0)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n_layers=st.integers(1, 200))
def test_ranges_from_cuts_partition(data, n_layers):
    inner = list(range(1, n_layers))
    cuts = sorted(data.draw(st.sets(st.sampled_from(inner)) if inner else st.just(set())))
    ranges = ranges_from_cuts(n_layers, cuts)
    assert len(ranges) == len(cuts) + 1
    _assert_partition(ranges, n_layers)
    assert [r.start for r in ranges[1:]] == cuts


@given(n_layers=st.integers(2, 60), cuts=st.lists(st.integers(-5, 65), min_size=1, max_size=4))
def test_ranges_from_bad_cuts_refused(n_layers, cuts):
    valid = cuts == sorted(set(cuts)) and all(0 < c < n_layers for c in cuts)
    if valid:
        _assert_partition(ranges_from_cuts(n_layers, cuts), n_layers)
    else:
        with pytest.raises(LayerRangeError):
            ranges_from_cuts(n_layers, cuts)


# --- shard files of a generated untied model ------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    spec = preset("tiny-llama-mha-untied")  # 4 layers, separate output.weight
    return generated_model(spec)


@pytest.fixture(scope="module")
def source_reader(source) -> gguf.GGUFReader:
    return gguf.GGUFReader(source)


@pytest.fixture(scope="module")
def shards(source, tmp_path_factory) -> dict[tuple[int, int], gguf.GGUFReader]:
    out_dir = tmp_path_factory.mktemp("shards")
    written = {r: write_shard(source, LayerRange(*r), out_dir / f"{r[0]}-{r[1]}.gguf")
               for r in RANGES}
    return {r: gguf.GGUFReader(shard.path) for r, shard in written.items()}


def _tensor_bytes(reader: gguf.GGUFReader, name: str) -> bytes:
    tensor = next(t for t in reader.tensors if t.name == name)
    return bytes(reader.data[tensor.data_offset:tensor.data_offset + tensor.n_bytes])


def _value(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _names(reader: gguf.GGUFReader) -> list[str]:
    return [t.name for t in reader.tensors]


def test_same_shard_same_bytes(source, tmp_path):
    a = write_shard(source, LayerRange(1, 3), tmp_path / "a.gguf")
    b = write_shard(source, LayerRange(1, 3), tmp_path / "b.gguf")
    assert a.sha256 == b.sha256 == hashlib.sha256(a.path.read_bytes()).hexdigest()
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.size == a.path.stat().st_size
    c = write_shard(source, LayerRange(1, 2), tmp_path / "c.gguf")
    d = write_shard(source, LayerRange(2, 3), tmp_path / "d.gguf")
    assert len({a.sha256, c.sha256, d.sha256}) == 3


@pytest.mark.parametrize("layers", [(0, 1), (1, 3)])
def test_non_final_shard_has_no_vocabulary(shards, layers):
    shard = shards[layers]
    assert _value(shard, Keys.Tokenizer.MODEL) == "none"
    assert _value(shard, VOCAB_SIZE) == 1
    assert "output.weight" not in _names(shard)
    embd = next(t for t in shard.tensors if t.name == "token_embd.weight")
    assert [int(d) for d in embd.shape] == [64, 1]
    assert not np.any(embd.data)


@pytest.mark.parametrize("layers", RANGES)
def test_tokenizer_only_in_the_last_shard(shards, source_reader, layers):
    """Non-final shards carry only ``tokenizer.ggml.model = "none"``; the last one the
    source's tokenizer as it is (its sampler needs token texts for grammars)."""
    shard = shards[layers]
    tokenizer = [k for k in source_reader.fields if k.startswith("tokenizer.")]
    assert "tokenizer.ggml.tokens" in tokenizer
    last = layers[1] == 4
    held = [k for k in shard.fields if k.startswith("tokenizer.")]
    assert held == (tokenizer if last else [Keys.Tokenizer.MODEL]), held
    # every other source key (every key, in the last shard) is carried over unchanged
    replaced = {VOCAB_SIZE, BLOCK_COUNT}
    for key, field in source_reader.fields.items():
        if key.startswith("GGUF.") or key in replaced or (
                key.startswith("tokenizer.") and not last):
            continue
        assert _value(shard, key) == field.contents(), key
    assert _value(shard, KEY_LAYER_START) == layers[0]
    assert _value(shard, KEY_LAYER_END) == layers[1]
    assert _value(shard, KEY_SOURCE_LAYERS) == 4
    assert _value(shard, KEY_SOURCE_VOCAB) == 384


@pytest.mark.parametrize("layers", RANGES)
def test_blocks_renumbered_from_zero(shards, source_reader, layers):
    start, end = layers
    shard = shards[layers]
    assert _value(shard, BLOCK_COUNT) == end - start
    blocks = {int(n.split(".")[1]) for n in _names(shard) if n.startswith("blk.")}
    assert blocks == set(range(end - start))
    for name in _names(source_reader):
        if not name.startswith("blk."):
            continue
        layer = int(name.split(".")[1])
        if start <= layer < end:
            renamed = name.replace(f"blk.{layer}.", f"blk.{layer - start}.", 1)
            assert _tensor_bytes(shard, renamed) == _tensor_bytes(source_reader, name), name
    assert _tensor_bytes(shard, "output_norm.weight") == _tensor_bytes(source_reader,
                                                                       "output_norm.weight")


def test_final_shard_has_one_vocabulary_matrix(shards, source_reader):
    """The lm head as output.weight, and a token_embd of the vocabulary's shape that holds
    only zeros of the smallest type (checked by llama.cpp's loader, never read)."""
    shard = shards[(3, 4)]
    assert _value(shard, VOCAB_SIZE) == 384
    vocab = {t.name: t for t in shard.tensors if len(t.shape) == 2 and t.shape[1] == 384}
    assert sorted(vocab) == ["output.weight", "token_embd.weight"]
    # untied: the lm head is the source's output.weight
    assert _tensor_bytes(shard, "output.weight") == _tensor_bytes(source_reader,
                                                                  "output.weight")
    assert _tensor_bytes(source_reader, "output.weight") != _tensor_bytes(source_reader,
                                                                          "token_embd.weight")
    unread = vocab["token_embd.weight"]
    assert not unread.data.any() and unread.data.nbytes < vocab["output.weight"].data.nbytes
    assert _value(shard, KEY_INPUT_OFFSET) is None


def test_whole_range_shard_is_the_model(shards, source_reader):
    shard = shards[(0, 4)]
    assert sorted(_names(shard)) == sorted(_names(source_reader))
    for name in _names(source_reader):
        assert _tensor_bytes(shard, name) == _tensor_bytes(source_reader, name), name
    assert _value(shard, KEY_INPUT_OFFSET) is None


def test_first_shard_carries_input_table(shards, source_reader):
    shard = shards[(0, 1)]
    embd = next(t for t in source_reader.tensors if t.name == "token_embd.weight")
    assert _value(shard, KEY_INPUT_TYPE) == int(embd.tensor_type)
    assert _value(shard, KEY_INPUT_ROWS) == 384
    start = shard.data_offset + _value(shard, KEY_INPUT_OFFSET)
    gguf_end = max(t.data_offset + t.n_bytes for t in shard.tensors)
    assert start >= gguf_end  # after every tensor llama.cpp sees
    table = bytes(shard.data[start:start + embd.n_bytes])
    assert len(table) == embd.n_bytes
    assert table == _tensor_bytes(source_reader, "token_embd.weight")


# --- tied embeddings: held once, by the last shard (format 4) -------------------------------


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    return generated_model(preset("tiny-llama-gqa"), "tied.gguf")  # 4 layers, tied


def test_tied_first_shard_holds_no_table_and_takes_rows(tied, tmp_path):
    facts = read_model_facts(tied)
    embd = facts.by_name["token_embd.weight"]
    layout = shard_layout(facts, LayerRange(0, 2))
    assert layout.input_table is None and layout.fed_input == embd
    shard = write_shard(tied, LayerRange(0, 2), tmp_path / "first.gguf", facts=facts)
    reader = gguf.GGUFReader(shard.path)
    assert _value(reader, KEY_INPUT_FED) is True
    assert _value(reader, KEY_INPUT_TYPE) == int(embd.ggml_type)
    assert _value(reader, KEY_INPUT_OFFSET) is None and _value(reader, KEY_INPUT_ROWS) is None
    gguf_end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    assert shard.size - gguf_end < reader.alignment, "nothing after the tensor data"
    last_layout = shard_layout(facts, LayerRange(2, 4))
    assert last_layout.output_embeds and not last_layout.fed_input


def test_tied_last_shard_says_its_lm_head_is_the_embedding(tied, tmp_path):
    facts = read_model_facts(tied)
    shard = write_shard(tied, LayerRange(2, 4), tmp_path / "last.gguf", facts=facts)
    reader = gguf.GGUFReader(shard.path)
    assert _value(reader, KEY_OUTPUT_EMBEDS) is True and _value(reader, KEY_INPUT_FED) is None
    assert _tensor_bytes(reader, "output.weight") == _source_bytes(
        tied, facts.by_name["token_embd.weight"])
    whole = write_shard(tied, LayerRange(0, 4), tmp_path / "whole.gguf", facts=facts)
    reader = gguf.GGUFReader(whole.path)
    assert _value(reader, KEY_OUTPUT_EMBEDS) is None and _value(reader, KEY_INPUT_FED) is None


def test_tied_split_holds_the_table_once(tied):
    """Every shard of a split together: the embedding's bytes once (the last stage's lm
    head), where format 3 held them twice."""
    facts = read_model_facts(tied)
    table = facts.by_name["token_embd.weight"].n_bytes
    for cuts in ([1], [2], [1, 3]):
        layouts = [shard_layout(facts, r) for r in ranges_from_cuts(facts.n_layers, cuts)]
        held = sum(t.n_bytes for lay in layouts for t in lay.tensors
                   if t.source is not None and t.source.name == "token_embd.weight")
        held += sum(lay.input_table.n_bytes for lay in layouts if lay.input_table)
        assert held == table, (cuts, held, table)


def _source_bytes(path: Path, tensor: TensorFacts) -> bytes:
    with path.open("rb") as f:
        f.seek(tensor.offset)
        return f.read(tensor.n_bytes)


def test_real_middle_shard_is_small(smollm2_path, tmp_path):
    facts = read_model_facts(smollm2_path)
    shard = write_shard(smollm2_path, LayerRange(10, 20), tmp_path / "mid.gguf", facts=facts)
    assert shard.size < 30_000_000 and shard.size < facts.file_size // 3, shard.size
    assert shard.size > sum(facts.layer_bytes[10:20])
    reader = gguf.GGUFReader(shard.path)
    assert _value(reader, BLOCK_COUNT) == 10 and _value(reader, VOCAB_SIZE) == 1
    assert _tensor_bytes(reader, "blk.0.attn_q.weight") == _source_bytes(
        smollm2_path, facts.by_name["blk.10.attn_q.weight"])


def test_real_last_shard_uses_tied_embedding(smollm2_path, tmp_path):
    facts = read_model_facts(smollm2_path)
    shard = write_shard(smollm2_path, LayerRange(25, 30), tmp_path / "last.gguf", facts=facts)
    reader = gguf.GGUFReader(shard.path)
    assert _tensor_bytes(reader, "output.weight") == _source_bytes(
        smollm2_path, facts.by_name["token_embd.weight"])
    assert not _tensor_bytes(reader, "token_embd.weight").strip(b"\0")
    assert _value(reader, VOCAB_SIZE) == 49152


# --- streaming and atomicity ----------------------------------------------------------------


def _peak_while_writing(model: Path, dest: Path, n_layers: int) -> int:
    tracemalloc.start()
    try:
        write_shard(model, LayerRange(0, n_layers - 1), dest)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_model(tmp_path):
    width = {"n_embd": 256, "n_ff": 1024}
    small = generated_model(preset("tiny-llama-gqa", n_layers=2, **width), "small.gguf")
    big = generated_model(preset("tiny-llama-gqa", n_layers=12, **width), "big.gguf")
    assert big.stat().st_size - small.stat().st_size > 30 << 20
    peak_small = _peak_while_writing(small, tmp_path / "s.gguf", 2)
    peak_big = _peak_while_writing(big, tmp_path / "b.gguf", 12)
    assert abs(peak_big - peak_small) < 8 << 20, (peak_small, peak_big)
    assert peak_big < big.stat().st_size // 3, (peak_big, big.stat().st_size)


class _Stop(Exception):
    pass


def test_crash_mid_write_leaves_no_file(source, tmp_path):
    calls: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total))
        if len(calls) == 5:
            raise _Stop

    dest = tmp_path / "shard.gguf"
    with pytest.raises(_Stop):
        write_shard(source, LayerRange(0, 2), dest, progress=progress)
    assert list(tmp_path.iterdir()) == []
    assert 0 < calls[-1][0] < calls[-1][1]

    dest.write_bytes(b"previous version")  # an interrupted rewrite keeps the old file
    calls.clear()
    with pytest.raises(_Stop):
        write_shard(source, LayerRange(0, 2), dest, progress=progress)
    assert list(tmp_path.iterdir()) == [dest] and dest.read_bytes() == b"previous version"


def test_progress_reaches_total(source, tmp_path):
    calls: list[tuple[int, int]] = []
    shard = write_shard(source, LayerRange(1, 4), tmp_path / "s.gguf",
                        progress=lambda done, total: calls.append((done, total)))
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and calls[-1] == (shard.layout.total_tensor_bytes,) * 2
