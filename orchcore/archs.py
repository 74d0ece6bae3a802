"""The architectures orch splits, described as data: one record each, read by everyone else.

A record says, for one ``general.architecture``:

* which tensors belong to a layer (``blk.N.*``, named in gguf-py's table for the
  architecture), to the first stage (the token embedding), to the last (final norm and
  lm head), and which are copied into every shard (rope factors);
* whether llama.cpp needs an explicit ``output.weight`` (it falls back to ``token_embd``
  for most architectures, not for all);
* which tensors hold all experts of a mixture-of-experts layer: memory holds every
  expert, a decode step reads only the ``expert_used_count`` the router picks;
* which metadata keys a shard slices to its own layers (per-layer arrays), which ones
  llama.cpp reads from layer 0 for every layer (a per-layer array must then be uniform),
  and which layers use sliding-window attention (rewritten per shard);
* the scale llama.cpp applies to token embeddings, which the first stage of a chain, fed
  embeddings it looked up itself, applies instead;
* what cannot be split exactly, with the reason.

The facts (``orchcore.facts``), the shard writer (``orchcore.shard``), the memory estimate
(``orchcore.memory``), slices and the planner read these records; none of them names an
architecture. Each record was checked against the llama.cpp build orch pins, and each
architecture is proven exact by tests (``tests/test_exact_generated.py``,
``tests/test_exact_archs.py``). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from gguf import (
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    MODEL_TENSOR,
    MODEL_TENSORS,
    TENSOR_NAMES,
    GGUFValueType,
    Keys,
)

if TYPE_CHECKING:
    from orchcore.facts import ModelFacts

_T = MODEL_TENSOR
BLOCK = "{bid}"


def _names(*kinds: MODEL_TENSOR) -> tuple[str, ...]:
    return tuple(TENSOR_NAMES[k] for k in kinds)


INPUT_TENSORS = _names(_T.TOKEN_EMBD)
HEAD_TENSORS = _names(_T.OUTPUT_NORM, _T.OUTPUT)
# Per-layer tensors holding every expert of a layer, without the "blk.{bid}." prefix.
EXPERT_TENSORS = tuple(n.removeprefix(f"blk.{BLOCK}.") for n in _names(
    _T.FFN_GATE_EXP, _T.FFN_UP_EXP, _T.FFN_DOWN_EXP, _T.FFN_GATE_UP_EXP))
# Keys every architecture may give per layer; llama.cpp checks such an array's length
# against block_count, so a shard carries the slice of its own layers.
_LAYER_KEYS = (Keys.Attention.HEAD_COUNT, Keys.Attention.HEAD_COUNT_KV,
               Keys.LLM.FEED_FORWARD_LENGTH)
# Mixture of experts: llama.cpp reads these per layer too, but uses layer 0's value for
# every layer (tensor shapes and the router's top-k): a per-layer array must be uniform.
_EXPERT_LAYER_KEYS = (Keys.LLM.EXPERT_USED_COUNT, Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)


class Rewrite(NamedTuple):
    """A metadata value a shard writes in place of the source's."""

    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None  # of an array's items


@dataclass(frozen=True)
class SlidingWindow:
    """Sliding-window attention on some layers, as llama.cpp reads it.

    Which layers slide: ``{arch}.attention.sliding_window_pattern``, either per-layer
    flags (an array whose length llama.cpp does not check) or a period n (absent:
    ``default_period``), layer ``il`` sliding when ``il % n < n - 1``. Both count layers
    from 0 *in the file*, so a shard, its layers renumbered from 0, always carries its own
    layers' flags as an array. A shard without a sliding layer gets
    ``sliding_window = 0`` instead: with a window llama.cpp builds the sliding-window
    graph and aborts the process when no layer slides. Sliding layers rotate with
    ``rope.freq_base_swa``, the others with ``rope.freq_base``: both follow the flags.

    KV cache: with ``swa_full`` (llama.cpp's default, which the engine keeps) a sliding
    layer holds the whole context like any other; see ``orchcore.memory.kv_cells``.
    """

    default_period: int = 6
    pattern_key: str = Keys.Attention.SLIDING_WINDOW_PATTERN
    window_key: str = Keys.Attention.SLIDING_WINDOW

    def flags(self, arch: str, value: Callable[[str], Any], n_layers: int
              ) -> tuple[bool, ...]:
        """Which of ``n_layers`` layers slide; ``value(key)`` reads a key (None: absent)."""
        if not value(self.window_key.format(arch=arch)):
            return (False,) * n_layers
        pattern = value(self.pattern_key.format(arch=arch))
        if isinstance(pattern, list):  # llama.cpp copies what there is; the rest is dense
            given = [bool(x) for x in pattern[:n_layers]]
            return (*given, *(False,) * (n_layers - len(given)))
        n = self.default_period if pattern is None else int(pattern)
        return tuple(n == 0 or il % n < n - 1 for il in range(n_layers))

    def rewrites(self, arch: str, flags: Sequence[bool]) -> dict[str, Rewrite | None]:
        """The keys of a shard whose layers slide as ``flags``; None: leave the key out."""
        pattern, window = self.pattern_key.format(arch=arch), self.window_key.format(arch=arch)
        if any(flags):
            return {pattern: Rewrite(list(flags), GGUFValueType.ARRAY, GGUFValueType.BOOL)}
        return {pattern: None, window: Rewrite(0, GGUFValueType.UINT32)}


Refusal = Callable[["ModelFacts"], "str | None"]


@dataclass(frozen=True)
class Architecture:
    """What orch must know to cut one architecture into exact layer ranges."""

    name: str
    tensors: tuple[str, ...]  # gguf-py's names for it ("blk.{bid}.attn_q", "token_embd")
    explicit_output: bool = False  # llama.cpp requires output.weight (no token_embd fallback)
    experts: tuple[str, ...] = ()  # per-layer tensors holding every expert (no blk. prefix)
    layer_keys: tuple[str, ...] = _LAYER_KEYS  # sliced to a shard's layers when per layer
    uniform_keys: tuple[str, ...] = ()  # llama.cpp uses layer 0's value for every layer
    sliding_window: SlidingWindow | None = None
    input_scale: Callable[[int], float] | None = None  # of n_embd: token embeddings' scale
    refusals: tuple[Refusal, ...] = ()
    notes: tuple[str, ...] = ()  # what else was checked, for ``orch info --archs``

    @property
    def layer_tensors(self) -> tuple[str, ...]:
        """Per-layer tensor names, ``{bid}`` for the layer: ``blk.{bid}.attn_q``."""
        return tuple(n for n in self.tensors if BLOCK in n)

    @property
    def shared_tensors(self) -> tuple[str, ...]:
        """Outside any layer, neither input nor head: copied into every shard."""
        return tuple(n for n in self.tensors if BLOCK not in n
                     and n not in INPUT_TENSORS + HEAD_TENSORS)

    def is_expert(self, in_block: str) -> bool:
        """``in_block`` is a tensor name after ``blk.N.``: ``ffn_up_exps.weight``."""
        return in_block.rsplit(".", 1)[0] in self.experts

    @property
    def sliced_keys(self) -> tuple[str, ...]:
        """Keys a shard slices to its layers when the source gives one value per layer."""
        return tuple(k.format(arch=self.name) for k in (*self.layer_keys, *self.uniform_keys))

    @property
    def uniform(self) -> tuple[str, ...]:
        return tuple(k.format(arch=self.name) for k in self.uniform_keys)

    def refusal(self, facts: ModelFacts) -> str | None:
        """Why ``facts`` cannot be split exactly, or None."""
        for rule in (*_COMMON_REFUSALS, *self.refusals):
            problem = rule(facts)
            if problem:
                return problem
        return None

    def describe(self) -> list[tuple[str, str]]:
        """The record as (what, value) rows, for ``orch info``."""
        layer = ", ".join(n.split(".", 2)[-1] for n in self.layer_tensors)
        rows = [
            ("layer tensors (blk.N.*)", layer),
            ("first stage", f"{', '.join(INPUT_TENSORS)} (as an input table in a chain)"),
            ("last stage", ", ".join(HEAD_TENSORS) + (
                " (output required: non-final shards carry a 1-row zero one)"
                if self.explicit_output else " (output falls back to token_embd)")),
            ("in every shard", ", ".join(self.shared_tensors) or "-"),
            ("experts", ", ".join(self.experts) +
             ": memory holds all, a token reads expert_used_count of them"
             if self.experts else "-"),
            ("sliced per shard", ", ".join(self.sliced_keys)),
            ("uniform across layers", ", ".join(self.uniform) or "-"),
        ]
        if self.sliding_window is not None:
            sw = self.sliding_window
            rows.append(("sliding window", f"{sw.pattern_key.format(arch=self.name)} rewritten "
                                           f"per shard (default period "
                                           f"{sw.default_period}); KV of sliding layers: "
                                           f"the whole context (swa_full)"))
        rows.append(("input scale", "sqrt(n_embd), applied by the first stage"
                     if self.input_scale else "-"))
        rows += [("note", note) for note in self.notes]
        return rows


def _nonuniform(facts: ModelFacts) -> str | None:
    if facts.nonuniform_keys:
        return (f"{', '.join(facts.nonuniform_keys)} differ between layers; llama.cpp uses "
                f"layer 0's value for every layer, so a shard starting elsewhere would "
                f"compute differently")
    return None


def _explicit_output(facts: ModelFacts) -> str | None:
    table = ARCHITECTURES[facts.arch]
    if table.explicit_output and facts.tied_output:
        return (f"{facts.arch} needs an output.weight tensor (llama.cpp does not fall back "
                f"to token_embd for it) and this file has none")
    return None


_COMMON_REFUSALS: tuple[Refusal, ...] = (_nonuniform, _explicit_output)

_GEMMA3_SCALED_LAYERS = 62  # llama.cpp: 62 layers means Gemma 3 27B


def _gemma3_attention_scale(facts: ModelFacts) -> str | None:
    # llama.cpp scales queries by 1/sqrt(n_embd / n_head) for a 62-layer model (27B) and by
    # 1/sqrt(key_length) otherwise: a shard's layer count would pick the other one.
    if facts.n_embd // facts.n_head != facts.head_dim_k and \
            facts.n_layers >= _GEMMA3_SCALED_LAYERS:
        return (f"gemma3 with {facts.n_layers} layers (Gemma 3 27B) cannot be split: "
                f"llama.cpp picks its attention scale (1/sqrt(n_embd/n_head) = "
                f"1/sqrt({facts.n_embd // facts.n_head}) instead of 1/sqrt(key_length) = "
                f"1/sqrt({facts.head_dim_k})) from the layer count, which a shard changes; "
                f"run it whole on one worker with llama.cpp")
    return None


def sqrt_n_embd(n_embd: int) -> float:
    """llama.cpp's ``sqrtf(n_embd)``, in float32 like the graph's ``ggml_scale``."""
    return float(np.sqrt(np.float32(n_embd)))


def _gguf_tensors(arch: MODEL_ARCH) -> tuple[str, ...]:
    return tuple(TENSOR_NAMES[t] for t in MODEL_TENSORS[arch])


def _arch(kind: MODEL_ARCH, **fields: Any) -> Architecture:
    return Architecture(name=MODEL_ARCH_NAMES[kind], tensors=_gguf_tensors(kind), **fields)


_MOE = {"experts": EXPERT_TENSORS, "uniform_keys": _EXPERT_LAYER_KEYS}

_TABLE: tuple[Architecture, ...] = (
    _arch(MODEL_ARCH.LLAMA, **_MOE,
          notes=("dense, or Mixtral-style experts (ffn_gate_inp and ffn_*_exps)",)),
    _arch(MODEL_ARCH.QWEN2),
    _arch(MODEL_ARCH.QWEN3),
    _arch(MODEL_ARCH.QWEN2MOE, explicit_output=True, **_MOE,
          notes=("shared expert (ffn_*_shexp, ffn_gate_inp_shexp) read by every token",
                 "the last shard's token_embd is never read: zeros of a small type")),
    _arch(MODEL_ARCH.QWEN3MOE, **_MOE),
    _arch(MODEL_ARCH.PHI3,
          notes=("fused attn_qkv; ffn_up holds gate and up (2 x feed_forward_length)",
                 "llama.cpp turns phi3's sliding window off: every layer attends to all",
                 "long or short rope factors by the per-session context against "
                 "rope.scaling.original_context_length: the same on every stage")),
    _arch(MODEL_ARCH.GEMMA3, sliding_window=SlidingWindow(), input_scale=sqrt_n_embd,
          refusals=(_gemma3_attention_scale,),
          notes=("Gemma 3 27B (62 layers) is refused: its attention scale depends on the "
                 "layer count",)),
)

ARCHITECTURES: Mapping[str, Architecture] = {a.name: a for a in _TABLE}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(ARCHITECTURES)


def unsupported(arch: str) -> str:
    """The message for an architecture without a record."""
    return (f"architecture {arch!r} is not supported for layer splitting; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")


__all__ = [
    "ARCHITECTURES",
    "EXPERT_TENSORS",
    "HEAD_TENSORS",
    "INPUT_TENSORS",
    "SUPPORTED_ARCHITECTURES",
    "Architecture",
    "Rewrite",
    "SlidingWindow",
    "sqrt_n_embd",
    "unsupported",
]
