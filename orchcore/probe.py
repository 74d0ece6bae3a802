"""The capability probe's shared half: which layer shape to time a worker on.

A worker's speed on *this* model is what the planner needs, so the probe runs a few
random-weight layers of the model's own shape and quantization type (``orchcore.modelgen``)
and reports seconds per layer per token. Decoding on a CPU reads every weight once per
token, so a probe layer of another size (an unsupported type is probed as the nearest
supported one) is scaled by the bytes per layer of the real model. A worker whose budget
cannot hold ``PROBE_LAYERS`` of them times fewer (``LayerShape.layers_within``).

A mixture-of-experts layer is probed as a dense layer as wide as the experts a token uses
(``ModelFacts.ffn_width``), scaled to the bytes a token reads
(``ModelFacts.active_layer_bytes``): the router picks ``expert_used_count`` experts, the
others stay in memory unread.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass

import gguf

from orchcore import modelgen
from orchcore.facts import ModelFacts

PROBE_LAYERS = 4
PROBE_PREFILL_TOKENS = 64  # the prompt a probe times (its decode steps: one token each)
PROBE_VOCAB = 512
_FALLBACK_TYPES = (modelgen.GType.Q4_0, modelgen.GType.Q8_0, modelgen.GType.F16)


@dataclass(frozen=True)
class LayerShape:
    arch: str
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    weight_type: int  # ggml type of the layer's largest matrices
    layer_bytes: int  # bytes a token reads in one of the real model's layers (the mean)

    @property
    def key(self) -> str:
        text = repr(sorted(asdict(self).items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def problem(self) -> str | None:
        """Why this shape cannot be probed at all (None if it can). A request names the
        shape, so it is checked whole before anything is allocated."""
        dims = (self.n_embd, self.n_ff, self.n_head, self.n_head_kv)
        if min(dims) < 1 or self.n_embd > 1 << 16 or self.n_ff > 1 << 18 or \
                self.n_head > 1024:
            return f"dimensions out of range: {self}"
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv or \
                (self.n_embd // self.n_head) % 2:
            return (f"{self.n_head} heads ({self.n_head_kv} for keys and values) do not "
                    f"divide {self.n_embd} into even head sizes")
        return None

    def probe_layer_bytes(self) -> int:
        """The weights of one probe layer (a shape ``problem`` accepts)."""
        qtype = self.spec().weight_type
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        head_dim = self.n_embd // self.n_head
        per_layer = self.n_embd * (2 * self.n_embd + 2 * head_dim * self.n_head_kv) + \
            3 * self.n_embd * self.n_ff
        return per_layer * block_bytes // block

    def layers_within(self, max_bytes: int) -> int:
        """How many probe layers (at most ``PROBE_LAYERS``) fit in ``max_bytes`` of weights:
        a small worker times fewer layers; 0 when not even one fits."""
        return min(PROBE_LAYERS, max_bytes // max(self.probe_layer_bytes(), 1))

    def spec(self, layers: int = PROBE_LAYERS) -> modelgen.ModelSpec:
        """A small model of ``layers`` layers of this shape that modelgen writes quickly."""
        known = self.weight_type in modelgen.GType._value2member_map_
        wanted = modelgen.GType(self.weight_type) if known else None
        candidates = [wanted] if wanted in modelgen.SUPPORTED_WEIGHT_TYPES else []
        for qtype in [*candidates, *_FALLBACK_TYPES]:
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if self.n_embd % block == 0 and self.n_ff % block == 0:
                break
        arch = self.arch if self.arch in modelgen.DENSE_ARCHS else "llama"
        return modelgen.ModelSpec(
            arch=arch, n_layers=layers, n_embd=self.n_embd, n_head=self.n_head,
            n_head_kv=self.n_head_kv, n_ff=self.n_ff, n_vocab=PROBE_VOCAB, weight_type=qtype,
            context_length=512, random_blocks=qtype in modelgen.RANDOM_BLOCK_TYPES)


def layer_shape(facts: ModelFacts) -> LayerShape:
    tensors = facts.layer_tensors(0)
    by_type: Counter[int] = Counter()
    for t in tensors:
        if len(t.shape) >= 2:  # matrices, and experts' stacks of them
            by_type[int(t.ggml_type)] += t.n_bytes
    weight_type = by_type.most_common(1)[0][0] if by_type else int(modelgen.GType.F32)
    return LayerShape(arch=facts.arch, n_embd=facts.n_embd, n_ff=facts.ffn_width,
                      n_head=facts.n_head, n_head_kv=facts.n_head_kv, weight_type=weight_type,
                      layer_bytes=sum(facts.active_layer_bytes) // facts.n_layers)
