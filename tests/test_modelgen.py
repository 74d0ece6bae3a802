"""The generated models load and run in llama.cpp, deterministically, with a real tokenizer."""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import numpy.typing as npt
import pytest

from orchcore import modelgen
from orchcore.modelgen import GType, ModelSpec, SpecError

PROMPT = "The capital of France is"
TINY_PRESETS = [name for name in modelgen.PRESETS if name.startswith("tiny-")]
K_QUANT = GType.Q4_K
CORE_TYPES = [GType.F32, GType.F16, GType.Q8_0, GType.Q4_0, K_QUANT]


class LlamaModel:
    """Just enough of llama.cpp's C API to tokenize and get logits (tests only).

    Extra buffer types are off: on CPUs with AMX they crash the first decode. One thread:
    on a busy 2-core machine ggml's spinning thread barriers made a tiny-model decode take
    seconds with 2 threads and milliseconds with 1.
    """

    def __init__(self, path: Path, n_ctx: int = 64, n_threads: int = 1) -> None:
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = False
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = n_ctx
        ctx_params.n_threads = ctx_params.n_threads_batch = n_threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not make a context for {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def close(self) -> None:
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 2))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, False)
        if n < 0:
            raise RuntimeError(f"llama_tokenize failed on {text!r}: {n}")
        return list(buf[:n])

    def detokenize(self, tokens: list[int]) -> str:
        ids = (llama_cpp.llama_token * len(tokens))(*tokens)
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_detokenize(self.vocab, ids, len(tokens), buf, len(buf), True, False)
        if n < 0:
            raise RuntimeError(f"llama_detokenize failed: {n}")
        return buf.raw[:n].decode()

    def run(self, prompt: list[int], n_new: int = 3) -> npt.NDArray[np.float32]:
        """Logits at every prompt position and at `n_new` greedy steps, from empty memory."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        rows = self._decode(prompt, 0)
        for _ in range(n_new):
            step = self._decode([int(rows[-1].argmax())], len(rows))
            rows = np.concatenate([rows, step])
        return rows

    def _decode(self, tokens: list[int], start: int) -> npt.NDArray[np.float32]:
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            batch.n_tokens = len(tokens)
            rc = llama_cpp.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            return np.array([
                np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i),
                                      shape=(self.n_vocab,))
                for i in range(len(tokens))
            ])
        finally:
            llama_cpp.llama_batch_free(batch)


@pytest.fixture
def load(tmp_path: Path) -> Iterator[Callable[..., LlamaModel]]:
    """Write a spec into tmp_path and open it; everything opened is closed afterwards."""
    opened: list[LlamaModel] = []

    def _load(spec: ModelSpec, name: str = "model.gguf") -> LlamaModel:
        model = LlamaModel(modelgen.write_model(tmp_path / name, spec))
        opened.append(model)
        return model

    yield _load
    for model in opened:
        model.close()


def _with_type(spec: ModelSpec, qtype: GType) -> ModelSpec:
    """`spec` with matrices of `qtype`, widened to the K-quants' 256-wide blocks if needed."""
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    return dataclasses.replace(spec, weight_type=qtype, n_embd=max(spec.n_embd, block_size),
                               n_ff=max(spec.n_ff, 2 * block_size))


def _assert_runs(model: LlamaModel, spec: ModelSpec) -> npt.NDArray[np.float32]:
    """Prompt plus 3 greedy steps: finite, varied, and the same when run again."""
    assert model.n_vocab == spec.n_vocab
    tokens = model.tokenize(PROMPT)
    first = model.run(tokens)
    assert first.shape == (len(tokens) + 3, spec.n_vocab)
    assert np.isfinite(first).all()
    assert (first.std(axis=1) > 1e-3).all(), "logits are (nearly) constant over the vocab"
    assert not np.array_equal(first[0], first[-1]), "logits do not depend on the input"
    np.testing.assert_array_equal(model.run(tokens), first)
    return first


@pytest.mark.parametrize("qtype", CORE_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("name", TINY_PRESETS)
def test_preset_runs_in_llama_cpp(load, name: str, qtype: GType) -> None:
    spec = _with_type(modelgen.preset(name), qtype)
    _assert_runs(load(spec), spec)


@pytest.mark.parametrize(
    "qtype", [t for t in modelgen.SUPPORTED_WEIGHT_TYPES if t not in CORE_TYPES],
    ids=lambda t: t.name,
)
def test_other_weight_types_run(load, qtype: GType) -> None:
    spec = _with_type(modelgen.preset("tiny-llama-gqa"), qtype)
    _assert_runs(load(spec), spec)


def test_same_spec_gives_same_logits_in_two_files(load) -> None:
    spec = modelgen.preset("tiny-qwen3", weight_type=GType.Q4_0)
    first, second = load(spec, "a.gguf"), load(spec, "b.gguf")
    tokens = first.tokenize(PROMPT)
    np.testing.assert_array_equal(first.run(tokens), second.run(tokens))


def test_random_blocks_run(load) -> None:
    spec = modelgen.preset("tiny-llama-gqa", weight_type=GType.Q4_0, random_blocks=True)
    _assert_runs(load(spec), spec)


def test_bench_preset_shape_runs_with_one_layer(load) -> None:
    full = modelgen.preset("bench-1b-q4_0")
    assert 1.0e9 < modelgen.n_params(full) < 1.1e9
    spec = dataclasses.replace(full, n_layers=1)
    _assert_runs(load(spec), spec)


def test_bench_1b_writes_whole_file(tmp_path: Path) -> None:
    """The benchmark model is written in full (speed is reported by bench/, not tested)."""
    path = modelgen.write_model(tmp_path / "bench.gguf", modelgen.preset("bench-1b-q4_0"))
    assert 550e6 < path.stat().st_size < 620e6


@pytest.mark.parametrize("text", ["hello world", PROMPT, "naïve café, 42!"])
def test_tokenizer_round_trip(load, text: str) -> None:
    model = load(modelgen.preset("tiny-llama-gqa"))
    tokens = model.tokenize(text)
    bos = llama_cpp.llama_vocab_bos(model.vocab)
    assert tokens[0] == bos and bos not in tokens[1:]
    assert all(0 <= t < model.n_vocab for t in tokens)
    # llama.cpp keeps the SentencePiece space prefix when it strips a leading BOS
    assert model.detokenize(tokens[1:]) == text


def test_write_is_byte_deterministic(tmp_path: Path) -> None:
    spec = modelgen.preset("tiny-qwen2", weight_type=GType.Q8_0)

    def digest(name: str, spec: ModelSpec) -> str:
        return hashlib.sha256(modelgen.write_model(tmp_path / name, spec).read_bytes()).hexdigest()

    assert digest("a.gguf", spec) == digest("b.gguf", spec)
    assert digest("c.gguf", spec) != digest("d.gguf", dataclasses.replace(spec, seed=1))
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_file_holds_the_plan(tmp_path: Path, name: str) -> None:
    spec = modelgen.preset(name, weight_type=GType.Q4_0)
    reader = gguf.GGUFReader(modelgen.write_model(tmp_path / "m.gguf", spec))
    found = {t.name: (t.tensor_type, tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    planned = {t.name: (t.qtype, t.shape) for t in modelgen.tensor_plan(spec)}
    assert found == planned
    block_count = reader.get_field(gguf.Keys.LLM.BLOCK_COUNT.format(arch=spec.arch))
    assert block_count is not None and block_count.contents() == spec.n_layers
    output = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    assert (output in found) == (not spec.tied)


@pytest.mark.parametrize("qtype", modelgen.RANDOM_BLOCK_TYPES, ids=lambda t: t.name)
def test_random_blocks_dequantize_to_tame_values(qtype: GType) -> None:
    data = modelgen.random_blocks(np.random.default_rng(0), (16, 512), qtype, std=0.02)
    values = gguf.quants.dequantize(data, qtype)
    assert values.shape == (16, 512)
    assert np.isfinite(values).all()
    assert 0.015 < values.std() < 0.03
    assert abs(values.mean()) < 0.005


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"weight_type": GType.Q4_0, "n_embd": 48, "n_head": 4}, "n_embd"),
        ({"weight_type": GType.Q8_0, "n_ff": 100}, "n_ff"),
        ({"weight_type": GType.Q6_K, "n_embd": 128}, "n_embd"),
        ({"n_head": 5}, "n_head"),
        ({"n_head": 4, "n_head_kv": 3}, "n_head_kv"),
        ({"n_vocab": 256}, "n_vocab"),
        ({"arch": "gpt2"}, "arch"),
        ({"n_layers": 0}, "n_layers"),
        ({"weight_type": GType.IQ2_XXS}, "weight_type"),
    ],
)
def test_bad_spec_names_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"ModelSpec\.{field}=") as info:
        ModelSpec(**changes)  # type: ignore[arg-type]
    assert isinstance(info.value, SpecError) and info.value.field == field


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="tiny-llama-gqa"):
        modelgen.preset("huge")
