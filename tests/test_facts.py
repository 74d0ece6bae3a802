"""Model facts from GGUF headers: the real model's numbers, and typed errors for bad files.

Every bad file (missing, a directory, empty, cut anywhere, wrong magic, not GGUF at all,
tensor data outside the file, a layer the block count does not know) gives a subclass of
``GGUFError`` whose message names the file and the problem, from ``read_model_facts`` and
from ``StageEngine`` alike: nothing a user points the program at may crash the process.
"""

from __future__ import annotations

import struct
from itertools import pairwise
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, Keys
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchcore.engine import EngineConfig, StageEngine
from orchcore.errors import (
    CorruptGGUFError,
    GGUFError,
    NotGGUFError,
    TruncatedGGUFError,
    UnsupportedModelError,
)
from orchcore.facts import SUPPORTED_ARCHITECTURES, read_model_facts
from orchcore.modelgen import ModelSpec, preset
from orchcore.shard import LayerRange, shard_layout
from testkit.models import generated_model

SPEC = ModelSpec()  # tiny llama: 4 layers, n_embd 64, vocab 384
ENGINE = EngineConfig(threads=1, context_tokens=32, max_sessions=1, batch_tokens=8)


def _expect_error(path: Path, kind: type[GGUFError], *fragments: str) -> GGUFError:
    """``read_model_facts`` and ``StageEngine`` both raise ``kind`` naming the file."""
    for load in (read_model_facts, lambda p: StageEngine(p, ENGINE)):
        with pytest.raises(kind) as info:
            load(path)
        message = str(info.value)
        assert str(path) in message, message
        for fragment in fragments:
            assert fragment in message, message
        assert info.value.path == path
    return info.value


def _value_pos(field: gguf.ReaderField) -> int:
    """File offset of a header field's last part (a key's value, a tensor's data offset)."""
    return field.offset + sum(int(part.nbytes) for part in field.parts[:-1])


# --- the real model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_facts(smollm2_path):
    return read_model_facts(smollm2_path)


def test_real_model_shape(real_facts):
    f = real_facts
    assert (f.arch, f.n_layers, f.n_embd) == ("llama", 30, 576)
    assert (f.n_head, f.n_head_kv, f.head_dim_k, f.head_dim_v) == (9, 3, 64, 64)
    assert f.n_vocab == 49152
    assert f.tied_output and "output.weight" not in f.by_name
    assert f.output_bytes == f.embedding_bytes
    assert f.is_supported
    assert f.by_name["token_embd.weight"].ggml_type == GGMLQuantizationType.Q8_0


def test_real_model_bytes_add_up(real_facts):
    f = real_facts
    assert len(set(f.layer_bytes)) == 1 and f.layer_bytes[0] > 0
    assert f.global_tensors == ()
    tensor_total = sum(t.n_bytes for t in f.tensors)
    assert sum(f.layer_bytes) + f.embedding_bytes + f.output_norm_bytes == tensor_total
    # The data section holds exactly these tensors, each padded to the alignment.
    padded = sum(-(-t.n_bytes // f.alignment) * f.alignment for t in f.tensors)
    data_bytes = f.file_size - f.data_offset
    assert padded - f.alignment < data_bytes <= padded
    spans = sorted((t.offset, t.offset + t.n_bytes) for t in f.tensors)
    assert spans[0][0] == f.data_offset and spans[-1][1] == f.file_size
    assert all(end <= start for (_, end), (start, _) in pairwise(spans))
    # One tensor checked against gguf's type table: a Q4_1 576x576 projection.
    q = f.by_name["blk.0.attn_q.weight"]
    block, size = gguf.GGML_QUANT_SIZES[q.ggml_type]
    assert q.shape == (576, 576) and q.n_bytes == 576 * 576 // block * size


def test_real_model_kv_bytes(real_facts):
    f = real_facts
    assert f.kv_bytes_per_token_per_layer() == 2 * (3 * 64) * 2  # K and V, F16
    assert f.kv_bytes_per_token_per_layer(GGMLQuantizationType.F16) == 768
    block, size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
    assert f.kv_bytes_per_token_per_layer(GGMLQuantizationType.Q8_0) == 2 * (192 // block) * size


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-llama-mha-untied", "tiny-qwen2",
                                  "tiny-qwen3"])
def test_generated_model_facts_match_spec(name, tmp_path):
    spec = preset(name, n_layers=3)
    f = read_model_facts(generated_model(spec, "m.gguf"))
    assert (f.arch, f.n_layers, f.n_embd, f.n_head, f.n_head_kv) == (
        spec.arch, 3, spec.n_embd, spec.n_head, spec.n_head_kv)
    assert (f.n_vocab, f.tied_output, f.n_ctx_train) == (
        spec.n_vocab, spec.tied, spec.context_length)
    assert f.output_bytes == (f.embedding_bytes if spec.tied else
                              f.by_name["output.weight"].n_bytes)
    assert len(set(f.layer_bytes)) == 1


# --- files that are not (whole) GGUF models -----------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return generated_model(SPEC)


@pytest.fixture(scope="module")
def regions(model) -> dict[str, tuple[int, int]]:
    """Byte ranges of the file's parts: fixed header, metadata, tensor table, tensor data."""
    reader = gguf.GGUFReader(model)
    kv_end = max(f.offset + sum(int(p.nbytes) for p in f.parts) for f in reader.fields.values())
    first_info = min(t.field.offset for t in reader.tensors)
    data_end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    assert kv_end == first_info
    return {
        "header": (0, 24),
        "metadata": (24, kv_end),
        "tensor-table": (kv_end, reader.data_offset),
        "tensor-data": (reader.data_offset, data_end),
    }


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.gguf", NotGGUFError, "no such file")


def test_directory(tmp_path):
    _expect_error(tmp_path, NotGGUFError, "not a regular file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    _expect_error(path, TruncatedGGUFError, "0 bytes")


def test_wrong_magic(model, tmp_path):
    path = tmp_path / "magic.gguf"
    path.write_bytes(b"GGML" + model.read_bytes()[4:])
    _expect_error(path, NotGGUFError, "not a GGUF file", "magic")


@pytest.mark.parametrize("content", [
    b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    b"The capital of France is Paris.\n" * 40,
    b"PK\x03\x04" + b"\x00" * 100,
], ids=["png", "text", "zip"])
def test_not_gguf(content, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    _expect_error(path, NotGGUFError, "not a GGUF file")


@pytest.mark.parametrize("version", [1, 99])
def test_unknown_version(model, tmp_path, version):
    data = bytearray(model.read_bytes())
    struct.pack_into("<I", data, 4, version)
    path = tmp_path / "version.gguf"
    path.write_bytes(data)
    _expect_error(path, CorruptGGUFError, f"version {version}")


@pytest.mark.parametrize("region", ["header", "metadata", "tensor-table", "tensor-data"])
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_anywhere(model, regions, region, where, tmp_path_factory):
    start, end = regions[region]
    cut = start + int(where * (end - start))
    path = tmp_path_factory.getbasetemp() / f"cut-{cut}.gguf"  # never next to the shared model
    path.write_bytes(model.read_bytes()[:cut])
    try:
        err = _expect_error(path, GGUFError)
        assert "truncated" in str(err) or "shorter than a GGUF header" in str(err)
    finally:
        path.unlink()


def test_truncated_inside_last_tensor_names_it(model, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(model.read_bytes()[:-10])
    _expect_error(path, TruncatedGGUFError, "'output_norm.weight'", "past the end")


@pytest.mark.parametrize("offset", ["just-past-end", "huge"])
def test_tensor_offset_past_end(model, tmp_path, offset):
    data = bytearray(model.read_bytes())
    reader = gguf.GGUFReader(model)
    tensor = next(t for t in reader.tensors if t.name == "blk.2.ffn_up.weight")
    new = len(data) - reader.data_offset if offset == "just-past-end" else 1 << 50
    struct.pack_into("<Q", data, _value_pos(tensor.field), new)
    path = tmp_path / "offset.gguf"
    path.write_bytes(data)
    _expect_error(path, GGUFError, "'blk.2.ffn_up.weight'", "past the end")


def test_layer_beyond_block_count(model, tmp_path):
    data = bytearray(model.read_bytes())
    reader = gguf.GGUFReader(model)
    field = next(t.field for t in reader.tensors if t.name == "blk.3.attn_q.weight")
    name_pos = field.offset + int(field.parts[0].nbytes)
    assert data[name_pos:name_pos + 19] == b"blk.3.attn_q.weight"
    data[name_pos:name_pos + 5] = b"blk.7"
    path = tmp_path / "layer.gguf"
    path.write_bytes(data)
    _expect_error(path, CorruptGGUFError, "'blk.7.attn_q.weight'", "layer 7", "4 layers")


@pytest.mark.parametrize(("count", "fragment"), [
    (0, "block count 0 is not positive"),
    (2, "belongs to layer 2 but the model has 2 layers"),
    (6, "layers without tensors: [4, 5]"),
])
def test_block_count_contradicts_tensors(model, tmp_path, count, fragment):
    data = bytearray(model.read_bytes())
    field = gguf.GGUFReader(model).fields[Keys.LLM.BLOCK_COUNT.format(arch="llama")]
    struct.pack_into("<I", data, _value_pos(field), count)
    path = tmp_path / "blocks.gguf"
    path.write_bytes(data)
    _expect_error(path, CorruptGGUFError, fragment)


# --- valid GGUF, architecture we cannot split ---------------------------------------------


def test_unsupported_architecture(model, tmp_path):
    """A whole model of another architecture (every ``llama.*`` key renamed ``gemma.*``)."""
    data = model.read_bytes()
    header_end = gguf.GGUFReader(model).data_offset
    path = tmp_path / "gemma.gguf"
    path.write_bytes(data[:header_end].replace(b"llama", b"gemma") + data[header_end:])
    facts = read_model_facts(path)  # the facts themselves are readable
    assert facts.arch == "gemma" and not facts.is_supported
    with pytest.raises(UnsupportedModelError) as info:
        shard_layout(facts, LayerRange(0, 2))
    with pytest.raises(UnsupportedModelError) as from_engine:
        StageEngine(path, ENGINE)
    for err in (info.value, from_engine.value):
        message = str(err)
        assert str(path) in message and "'gemma'" in message, message
        assert all(arch in message for arch in SUPPORTED_ARCHITECTURES), message


def _arch_only_rewritten(model: Path, tmp_path: Path) -> Path:
    data = bytearray(model.read_bytes())
    field = gguf.GGUFReader(model).fields[Keys.General.ARCHITECTURE]
    pos = _value_pos(field)
    assert data[pos:pos + 5] == b"llama"
    data[pos:pos + 5] = b"gemma"
    path = tmp_path / "arch.gguf"
    path.write_bytes(data)
    return path


def test_architecture_rewritten_alone_is_typed(model, tmp_path):
    """``general.architecture`` changed but the keys still say ``llama.*``."""
    _expect_error(_arch_only_rewritten(model, tmp_path), UnsupportedModelError, "gemma")


def test_architecture_rewritten_alone_lists_supported(model, tmp_path):
    _expect_error(_arch_only_rewritten(model, tmp_path), UnsupportedModelError,
                  *SUPPORTED_ARCHITECTURES)


def test_good_model_still_loads(model):
    """The fixture itself is fine: the failures above come from the damage only."""
    facts = read_model_facts(model)
    assert (facts.n_layers, facts.n_vocab) == (SPEC.n_layers, SPEC.n_vocab)
    with StageEngine(model, ENGINE) as engine:
        logits = engine.forward("s", [0, 1], tokens=[1, 20])
    assert logits.shape == (1, SPEC.n_vocab) and np.isfinite(logits).all()
