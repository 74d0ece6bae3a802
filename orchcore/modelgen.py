"""Random-weight GGUF models that llama.cpp loads and runs: for tests, benchmarks, and
the capability probe that times a worker on layers shaped like the model at hand.

A model is described by one value, `ModelSpec`, and `write_model` turns it into a file,
or into a gguf-split set of files (`split_max_tensors`) holding the same tensors and
metadata. The same spec always gives the same bytes. Names, keys and block sizes come from the
`gguf` package's tables; the only format facts typed here are the positions of the f16
scale fields inside a quantized block (`_BLOCK_SCALES`), which gguf-py does not describe
as data, and which the tests check against gguf's own dequantizer.

Weights are random but tame (matrices ~N(0, 0.02), norms ~1, small biases), so
activations stay finite through every layer and logits differ between tokens. They mean
nothing: these models are good for shapes, sizes, speed and exactness, not for text.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import shutil
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import numpy.typing as npt

from orchcore.modelblocks import MATRIX_STD, RANDOM_BLOCK_TYPES, random_blocks
from orchcore.modelvocab import MIN_VOCAB, add_tokenizer

_NORM_NOISE = 0.1  # norm weights are 1 + _NORM_NOISE * N(0, 1)
_BIAS_STD = 0.02
_ROUTER_STD = 0.1  # expert routers: logits of a few units, so tokens pick different experts
_RMS_EPS = 1e-5
_ROPE_FREQ_BASE = 10000.0

GType = gguf.GGMLQuantizationType


_FILE_TYPES: Mapping[GType, gguf.LlamaFileType] = {
    GType.F32: gguf.LlamaFileType.ALL_F32,
    GType.F16: gguf.LlamaFileType.MOSTLY_F16,
    GType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    GType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    GType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    GType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    GType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    GType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    GType.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
    GType.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S,
    GType.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
}
SUPPORTED_WEIGHT_TYPES: tuple[GType, ...] = tuple(_FILE_TYPES)

_T = gguf.MODEL_TENSOR
_ATTN_BIASES = (_T.ATTN_Q, _T.ATTN_K, _T.ATTN_V)
_HEAD_NORMS = (_T.ATTN_Q_NORM, _T.ATTN_K_NORM)
_EXPERTS = (_T.FFN_GATE_EXP, _T.FFN_UP_EXP)  # then FFN_DOWN_EXP
_SHARED_EXPERT = (_T.FFN_GATE_SHEXP, _T.FFN_UP_SHEXP)  # then FFN_DOWN_SHEXP


class _Layout(NamedTuple):
    """How one architecture's layers are made, as llama.cpp's loader expects them."""

    biases: bool = False  # q/k/v biases
    head_norms: bool = False  # per-head q/k norms
    fused_qkv: bool = False  # one attn_qkv matrix (phi3)
    gated_ffn: bool = True  # False: ffn_up holds gate and up, 2 x n_ff rows (phi3)
    post_norms: bool = False  # post_attention_norm and post_ffw_norm (gemma3)
    experts: str = "never"  # "never", "optional" (llama: n_expert > 0) or "always"
    expert_width_key: bool = False  # writes expert_feed_forward_length (else n_ff is it)
    shared_expert: bool = False  # ffn_*_shexp and ffn_gate_inp_shexp (qwen2moe)
    untied: bool = False  # output.weight required
    rope_factors: bool = False  # global rope_factors_long/short (phi3)
    sliding_window: bool = False  # may have {arch}.attention.sliding_window
    rope_freq_base: float = _ROPE_FREQ_BASE
    rope_freq_base_swa: float | None = None  # sliding-window layers' base (gemma3)
    # Control tokens llama.cpp looks up by text for this architecture's models (phi3).
    extra_special: tuple[str, ...] = ()


_A = gguf.MODEL_ARCH
_LAYOUTS: Mapping[str, _Layout] = {gguf.MODEL_ARCH_NAMES[arch]: layout for arch, layout in {
    _A.LLAMA: _Layout(experts="optional"),
    _A.QWEN2: _Layout(biases=True),
    _A.QWEN3: _Layout(head_norms=True),
    _A.QWEN2MOE: _Layout(biases=True, experts="always", expert_width_key=True,
                         shared_expert=True, untied=True),
    _A.QWEN3MOE: _Layout(head_norms=True, experts="always", expert_width_key=True),
    _A.PHI3: _Layout(fused_qkv=True, gated_ffn=False, rope_factors=True,
                     sliding_window=True, extra_special=("<|endoftext|>",)),
    _A.GEMMA3: _Layout(head_norms=True, post_norms=True, sliding_window=True,
                       rope_freq_base=1e6, rope_freq_base_swa=1e4),
}.items()}
# Architectures modelgen writes as a dense model of any shape (the probe's layers).
DENSE_ARCHS: tuple[str, ...] = tuple(
    name for name, layout in _LAYOUTS.items() if layout.experts != "always" and not layout.untied)



class SpecError(ValueError):
    """A ModelSpec field has a value no valid model can have."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"ModelSpec.{field}={value!r}: {reason}")
        self.field = field
        self.value = value


@dataclass(frozen=True)
class ModelSpec:
    """Shape, types and seed of a random-weight model; validated on construction."""

    arch: str = "llama"  # a key of _LAYOUTS: "llama", "qwen2" (q/k/v biases), "qwen3"...
    n_layers: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2  # == n_head: multi-head attention; a divisor of n_head: GQA
    n_ff: int = 128
    n_vocab: int = 384  # at least MIN_VOCAB: specials, 256 byte pieces and the word marker
    tied: bool = True  # False: a separate output.weight instead of reusing token_embd
    weight_type: GType = GType.F32  # type of the 2-D matrices; norms and biases stay F32
    context_length: int = 512  # tokens
    seed: int = 0
    # True: quantized matrices are random valid blocks made directly (fast, memory of one
    # tensor). False: N(0, 0.02) floats quantized by gguf.quants, except for types gguf
    # cannot quantize (the K-quants in gguf 0.19), which always get random blocks.
    random_blocks: bool = False
    # Mixture of experts: experts per layer, used per token, one expert's feed-forward
    # width (0: n_ff, as llama has it) and the shared expert's (qwen2moe).
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    sliding_window: int = 0  # gemma3 (and phi3, where llama.cpp ignores it); 0: none
    swa_pattern: int | tuple[bool, ...] | None = None  # gemma3: period or flags; None: 6
    original_context_length: int = 0  # phi3's rope.scaling.original_context_length

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.head_dim * self.n_head_kv

    @property
    def expert_width(self) -> int:
        return self.n_ff_exp or self.n_ff


def _validate(spec: ModelSpec) -> None:
    if spec.arch not in _LAYOUTS:
        raise SpecError("arch", spec.arch, f"supported: {sorted(_LAYOUTS)}")
    _validate_layout(spec, _LAYOUTS[spec.arch])
    for field in ("n_layers", "n_embd", "n_head", "n_head_kv", "n_ff", "context_length"):
        if getattr(spec, field) < 1:
            raise SpecError(field, getattr(spec, field), "must be at least 1")
    if spec.seed < 0:
        raise SpecError("seed", spec.seed, "must be non-negative")
    min_vocab = MIN_VOCAB + len(_LAYOUTS[spec.arch].extra_special)
    if spec.n_vocab < min_vocab:
        raise SpecError("n_vocab", spec.n_vocab, f"the tokenizer needs at least {min_vocab}")
    if spec.n_embd % spec.n_head:
        raise SpecError("n_head", spec.n_head, f"must divide n_embd={spec.n_embd}")
    if spec.head_dim % 2:
        raise SpecError("n_head", spec.n_head, "n_embd / n_head must be even for RoPE")
    if spec.n_head % spec.n_head_kv:
        raise SpecError("n_head_kv", spec.n_head_kv, f"must divide n_head={spec.n_head}")
    if spec.weight_type not in _FILE_TYPES:
        names = [t.name for t in SUPPORTED_WEIGHT_TYPES]
        raise SpecError("weight_type", spec.weight_type, f"supported: {names}")
    block_size, _ = gguf.GGML_QUANT_SIZES[spec.weight_type]
    for field in ("n_embd", "n_ff", "n_ff_exp", "n_ff_shexp"):  # the matrices' row lengths
        if getattr(spec, field) % block_size:
            raise SpecError(
                field, getattr(spec, field),
                f"must be a multiple of {block_size}, the {spec.weight_type.name} block size",
            )


def _validate_layout(spec: ModelSpec, layout: _Layout) -> None:
    moe = spec.n_expert > 0
    if layout.experts == "always" and not moe:
        raise SpecError("n_expert", spec.n_expert, f"{spec.arch} has experts: at least 1")
    if layout.experts == "never" and moe:
        raise SpecError("n_expert", spec.n_expert, f"{spec.arch} has no experts: 0")
    if moe and not 1 <= spec.n_expert_used <= spec.n_expert:
        raise SpecError("n_expert_used", spec.n_expert_used, f"in 1..{spec.n_expert}")
    if spec.n_ff_exp and not (moe and layout.expert_width_key):
        raise SpecError("n_ff_exp", spec.n_ff_exp, f"{spec.arch}'s experts are n_ff wide: 0")
    if layout.shared_expert != (spec.n_ff_shexp > 0):
        raise SpecError("n_ff_shexp", spec.n_ff_shexp,
                        "required" if layout.shared_expert else f"{spec.arch} has none: 0")
    if layout.untied and spec.tied:
        raise SpecError("tied", spec.tied, f"{spec.arch} requires output.weight: False")
    if (spec.sliding_window or spec.swa_pattern is not None) and not layout.sliding_window:
        raise SpecError("sliding_window", spec.sliding_window, f"{spec.arch} has none")
    if spec.original_context_length and not layout.rope_factors:
        raise SpecError("original_context_length", spec.original_context_length,
                        f"{spec.arch} has no rope factors")


class Role(enum.Enum):
    MATRIX = "matrix"  # spec.weight_type, ~N(0, 0.02)
    NORM = "norm"  # F32, ~1
    BIAS = "bias"  # F32, small
    ROUTER = "router"  # F32, ~N(0, 0.1): expert choices differ between tokens


class TensorSpec(NamedTuple):
    name: str
    shape: tuple[int, ...]  # numpy order: (rows, row length), the reverse of ggml's ne
    role: Role
    qtype: GType


def tensor_plan(spec: ModelSpec) -> list[TensorSpec]:
    """Every tensor of the model, in file order."""

    def tensor(kind: gguf.MODEL_TENSOR, suffix: str, shape: tuple[int, ...], role: Role,
               bid: int | None = None) -> TensorSpec:
        base = gguf.TENSOR_NAMES[kind].format(bid=bid)
        qtype = spec.weight_type if role is Role.MATRIX else GType.F32
        return TensorSpec(f"{base}.{suffix}", shape, role, qtype)

    d, d_kv = spec.n_embd, spec.n_embd_kv
    layout = _LAYOUTS[spec.arch]
    plan = [tensor(_T.TOKEN_EMBD, "weight", (spec.n_vocab, d), Role.MATRIX)]
    if layout.rope_factors:
        plan += [tensor(k, "weight", (spec.head_dim // 2,), Role.NORM)
                 for k in (_T.ROPE_FACTORS_LONG, _T.ROPE_FACTORS_SHORT)]
    for i in range(spec.n_layers):
        plan.append(tensor(_T.ATTN_NORM, "weight", (d,), Role.NORM, i))
        if layout.fused_qkv:
            plan.append(tensor(_T.ATTN_QKV, "weight", (d + 2 * d_kv, d), Role.MATRIX, i))
        else:
            plan += [tensor(k, "weight", (n, d), Role.MATRIX, i)
                     for k, n in zip(_ATTN_BIASES, (d, d_kv, d_kv), strict=True)]
        if layout.biases:
            sizes = (d, d_kv, d_kv)
            plan += [tensor(k, "bias", (n,), Role.BIAS, i)
                     for k, n in zip(_ATTN_BIASES, sizes, strict=True)]
        if layout.head_norms:
            plan += [tensor(k, "weight", (spec.head_dim,), Role.NORM, i) for k in _HEAD_NORMS]
        plan.append(tensor(_T.ATTN_OUT, "weight", (d, d), Role.MATRIX, i))
        if layout.post_norms:
            plan.append(tensor(_T.ATTN_POST_NORM, "weight", (d,), Role.NORM, i))
        plan.append(tensor(_T.FFN_NORM, "weight", (d,), Role.NORM, i))
        plan += _ffn_plan(spec, layout, tensor, i)
        if layout.post_norms:
            plan.append(tensor(_T.FFN_POST_NORM, "weight", (d,), Role.NORM, i))
    plan.append(tensor(_T.OUTPUT_NORM, "weight", (d,), Role.NORM))
    if not spec.tied:
        plan.append(tensor(_T.OUTPUT, "weight", (spec.n_vocab, d), Role.MATRIX))
    return plan


def _ffn_plan(spec: ModelSpec, layout: _Layout, tensor: Callable[..., TensorSpec], i: int
              ) -> list[TensorSpec]:
    """One layer's feed-forward: dense (gated or not), or experts (3-D, numpy order
    (n_expert, rows, row length)) with a router and maybe a shared expert."""
    d, n_ff = spec.n_embd, spec.n_ff
    if spec.n_expert:
        w, n = spec.expert_width, spec.n_expert
        plan = [tensor(_T.FFN_GATE_INP, "weight", (n, d), Role.ROUTER, i)]
        plan += [tensor(k, "weight", (n, w, d), Role.MATRIX, i) for k in _EXPERTS]
        plan.append(tensor(_T.FFN_DOWN_EXP, "weight", (n, d, w), Role.MATRIX, i))
        if layout.shared_expert:
            s = spec.n_ff_shexp
            plan.append(tensor(_T.FFN_GATE_INP_SHEXP, "weight", (d,), Role.ROUTER, i))
            plan += [tensor(k, "weight", (s, d), Role.MATRIX, i) for k in _SHARED_EXPERT]
            plan.append(tensor(_T.FFN_DOWN_SHEXP, "weight", (d, s), Role.MATRIX, i))
        return plan
    if not layout.gated_ffn:
        return [tensor(_T.FFN_UP, "weight", (2 * n_ff, d), Role.MATRIX, i),
                tensor(_T.FFN_DOWN, "weight", (d, n_ff), Role.MATRIX, i)]
    return [tensor(_T.FFN_GATE, "weight", (n_ff, d), Role.MATRIX, i),
            tensor(_T.FFN_UP, "weight", (n_ff, d), Role.MATRIX, i),
            tensor(_T.FFN_DOWN, "weight", (d, n_ff), Role.MATRIX, i)]


def n_params(spec: ModelSpec) -> int:
    return sum(int(np.prod(t.shape)) for t in tensor_plan(spec))


def write_model(path: Path, spec: ModelSpec, *, split_max_tensors: int = 0,
                sparse: bool = False) -> Path:
    """Write the model described by `spec` to `path`, one tensor at a time; return its path.

    With `split_max_tensors` > 0 and more tensors than that, the model is written as a
    gguf-split set of files of at most that many tensors each, named as llama.cpp expects
    (`m.gguf` -> `m-00001-of-00003.gguf`, ...): the tensors and metadata of the single
    file, plus the `split.*` keys. The first file's path is returned.

    With `sparse`, the tensor data is a hole: the header, the tensor infos and the file's
    size are the model's, written in a moment and taking no disk, but the weights are
    zeros (facts and plans for a model of any size; not a model to run).

    Memory use is that of the largest tensor. Files appear under their names only when
    complete: they are written in the folder `<name>.partial` and moved out, the first last.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(partial / path.name, spec.arch,
                             split_max_tensors=split_max_tensors)
    try:
        _write_model(writer, spec, sparse)
    except BaseException:
        writer.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    writer.close()
    files = writer.format_shard_names(partial / path.name)  # gguf-py's names of the set
    for file in reversed(files):
        file.replace(path.with_name(file.name))
    partial.rmdir()
    return path.with_name(files[0].name)


def _write_model(writer: gguf.GGUFWriter, spec: ModelSpec, sparse: bool = False) -> None:
    """Metadata, tensor infos and tensors of `spec`, through `writer` (`sparse`: the
    tensor data left a hole of its size)."""
    plan = tensor_plan(spec)
    _add_hparams(writer, spec)
    add_tokenizer(writer, spec.n_vocab, _LAYOUTS[spec.arch].extra_special)
    for t in plan:
        byte_shape = _byte_shape(t)
        writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8),
                               int(np.prod(byte_shape)), raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if sparse:
        pad = gguf.GGUFWriter.ggml_pad
        for fout, tensors in zip(writer.fout or (), writer.tensors, strict=True):
            data = sum(pad(ti.nbytes, writer.data_alignment) for ti in tensors.values())
            fout.truncate(pad(fout.tell(), writer.data_alignment) + data)
        return
    for t in plan:
        writer.write_tensor_data(_tensor_bytes(t, spec))


def _add_hparams(writer: gguf.GGUFWriter, spec: ModelSpec) -> None:
    writer.add_name(f"modelgen-{spec.arch}-{spec.weight_type.name}-seed{spec.seed}")
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layers)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(spec.head_dim)
    layout = _LAYOUTS[spec.arch]
    writer.add_rope_freq_base(layout.rope_freq_base)
    writer.add_layer_norm_rms_eps(_RMS_EPS)
    writer.add_vocab_size(spec.n_vocab)
    writer.add_file_type(_FILE_TYPES[spec.weight_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if spec.n_expert:
        writer.add_expert_count(spec.n_expert)
        writer.add_expert_used_count(spec.n_expert_used)
        if layout.expert_width_key:
            writer.add_expert_feed_forward_length(spec.expert_width)
        if spec.n_ff_shexp:
            writer.add_expert_shared_feed_forward_length(spec.n_ff_shexp)
    if spec.sliding_window:
        writer.add_sliding_window(spec.sliding_window)
    if spec.swa_pattern is not None:
        writer.add_sliding_window_pattern(spec.swa_pattern)
    if layout.rope_freq_base_swa is not None:
        writer.add_rope_freq_base_swa(layout.rope_freq_base_swa)
    if spec.original_context_length:
        writer.add_rope_scaling_orig_ctx_len(spec.original_context_length)


def _byte_shape(t: TensorSpec) -> tuple[int, ...]:
    return gguf.quant_shape_to_byte_shape(t.shape, t.qtype)


def _tensor_bytes(t: TensorSpec, spec: ModelSpec) -> npt.NDArray[np.uint8]:
    # one generator per tensor, keyed by its name: a tensor does not depend on the others
    rng = np.random.default_rng([spec.seed, zlib.crc32(t.name.encode())])
    if t.role is Role.NORM:
        values = 1.0 + _NORM_NOISE * rng.standard_normal(t.shape, dtype=np.float32)
    elif t.role is Role.BIAS:
        values = _BIAS_STD * rng.standard_normal(t.shape, dtype=np.float32)
    elif t.role is Role.ROUTER:
        values = _ROUTER_STD * rng.standard_normal(t.shape, dtype=np.float32)
    elif t.qtype in RANDOM_BLOCK_TYPES and (spec.random_blocks or not _gguf_quantizes(t.qtype)):
        return random_blocks(rng, t.shape, t.qtype)
    else:
        values = MATRIX_STD * rng.standard_normal(t.shape, dtype=np.float32)
    return gguf.quants.quantize(values, t.qtype).view(np.uint8)


@functools.cache
def _gguf_quantizes(qtype: GType) -> bool:
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.quantize(np.zeros((1, block_size), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


PRESETS: Mapping[str, ModelSpec] = {
    "tiny-llama-gqa": ModelSpec(),
    "tiny-llama-mha-untied": ModelSpec(n_head_kv=4, tied=False),
    "tiny-qwen2": ModelSpec(arch="qwen2"),
    "tiny-qwen3": ModelSpec(arch="qwen3"),
    # One per further architecture orch splits (tests/test_exact_archs.py).
    "arch-llama-moe": ModelSpec(n_expert=4, n_expert_used=2),  # Mixtral-style
    "arch-qwen3moe": ModelSpec(arch="qwen3moe", n_expert=8, n_expert_used=2, n_ff_exp=64),
    "arch-qwen2moe": ModelSpec(arch="qwen2moe", n_expert=8, n_expert_used=2, n_ff_exp=64,
                               n_ff_shexp=96, tied=False),
    # Sliding window 4 (short prompts cross it); the default period 6: layer 5 is global.
    "arch-gemma3": ModelSpec(arch="gemma3", n_layers=7, sliding_window=4),
    # llama.cpp ignores phi3's window; a test context above 32 picks the long factors.
    "arch-phi3": ModelSpec(arch="phi3", n_head_kv=4, sliding_window=8,
                           original_context_length=32),
    # Qwen3-30B-A3B's proportions scaled down (48 -> 12 layers, 2048 -> 256 wide): 128
    # experts of which 8 per token, so a token reads about a tenth of a layer's bytes.
    "qwen3moe-30b-a3b-mini": ModelSpec(
        arch="qwen3moe", n_layers=12, n_embd=256, n_head=8, n_head_kv=2, n_ff=512,
        n_vocab=2048, n_expert=128, n_expert_used=8, n_ff_exp=64, weight_type=GType.Q8_0,
        context_length=4096, random_blocks=True),
    # Real shapes (random weights), for sizes, memory, speed and plans at full scale.
    # Qwen3-30B-A3B: 48 layers of 128 experts (8 per token), untied head; about 16.8 GB.
    "qwen3moe-30b-a3b": ModelSpec(
        arch="qwen3moe", n_layers=48, n_embd=2048, n_head=32, n_head_kv=4, n_ff=6144,
        n_vocab=151936, n_expert=128, n_expert_used=8, n_ff_exp=768, tied=False,
        weight_type=GType.Q4_0, context_length=4096, random_blocks=True),
    # Qwen3-8B: dense, 36 layers 4096 wide, untied 151,936-row head; about 4.6 GB.
    "qwen3-8b": ModelSpec(
        arch="qwen3", n_layers=36, n_embd=4096, n_head=32, n_head_kv=8, n_ff=12288,
        n_vocab=151936, tied=False, weight_type=GType.Q4_0, context_length=4096,
        random_blocks=True),
    # Llama 3.1 8B: 32 layers 4096 wide, untied 128,256-row head.
    "llama3.1-8b": ModelSpec(
        n_layers=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256,
        tied=False, weight_type=GType.Q4_0, context_length=4096, random_blocks=True),
    # Llama-3.2-1B-like body with a 32k vocabulary: 1.04e9 parameters, about 586 MB
    "bench-1b-q4_0": ModelSpec(
        n_layers=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, n_vocab=32000,
        weight_type=GType.Q4_0, context_length=2048, random_blocks=True,
    ),
}


def preset(name: str, **changes: object) -> ModelSpec:
    """A named spec, optionally with some fields changed (validated again)."""
    try:
        spec = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
    return dataclasses.replace(spec, **changes) if changes else spec
