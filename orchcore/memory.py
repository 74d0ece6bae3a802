"""How much memory a stage's whole worker process needs: one pure estimate for both sides.

A memory budget is the MiB a worker's *whole process* may use: interpreter, libraries,
the shard's weights, the KV cache at the chosen context and sessions, the logits buffer
and llama.cpp's compute buffers. That is what "use at most 3 GB of this Pi" means. The
planner estimates each stage before anything is sent (``estimate_stage``); the worker
checks the same figure for the shard it received (``estimate_shard``); both end in
``_estimate``, so they agree to the byte.

The constants were measured (``bench/engine_memory.py``, docs/benchmarks.md) and are
tested against the peak RSS of real worker processes (tests/test_memory.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from gguf import GGMLQuantizationType

from orchcore.config import EngineConfig
from orchcore.facts import ModelFacts, type_bytes
from orchcore.shard import KEY_INPUT_ROWS, KEY_INPUT_TYPE, LayerRange

MIB = 1 << 20
DEFAULT_RESERVE_MB = 512  # a worker without a budget leaves this much RAM to the machine
# A worker process with nothing loaded: Python, numpy, gRPC, llama.cpp's libraries.
PROCESS_BASELINE_BYTES = 160 * MIB
# llama.cpp's compute buffer: graph intermediates per row of a batch, in floats of width
# n_ff and n_embd, plus a fixed part (measured; see the module docstring).
_COMPUTE_FIXED_BYTES = 16 * MIB
_COMPUTE_FF_ROWS = 4
_COMPUTE_EMBD_ROWS = 8


@dataclass(frozen=True)
class MemoryEstimate:
    baseline: int
    weights: int
    kv_cache: int
    logits: int
    compute: int

    @property
    def total(self) -> int:
        return self.baseline + self.weights + self.kv_cache + self.logits + self.compute

    def describe(self) -> str:
        def mib(n: int) -> str:
            return f"{n / MIB:.0f}"

        return (f"{mib(self.total)} MiB (weights {mib(self.weights)}, KV {mib(self.kv_cache)}, "
                f"logits {mib(self.logits)}, compute {mib(self.compute)}, process "
                f"{mib(self.baseline)})")


def default_budget(available_bytes: int, reserve_mb: int = DEFAULT_RESERVE_MB) -> int:
    """A worker's budget when none is set: the RAM available at start minus a reserve."""
    return max(0, available_bytes - (reserve_mb << 20))


def _estimate(*, weights: int, kv_per_token: int, n_vocab_out: int, n_embd: int, n_ff: int,
              config: EngineConfig) -> MemoryEstimate:
    rows = config.batch_tokens
    # The last stage keeps logits for one row per session and step, in llama.cpp's output
    # buffer and the copy handed to the sampler.
    logits = n_vocab_out * 4 * max(config.max_sessions, 1) * 2 if n_vocab_out > 1 else 0
    compute = _COMPUTE_FIXED_BYTES + 4 * rows * (
        _COMPUTE_FF_ROWS * n_ff + _COMPUTE_EMBD_ROWS * n_embd)
    return MemoryEstimate(baseline=PROCESS_BASELINE_BYTES, weights=weights,
                          kv_cache=kv_per_token * config.kv_tokens, logits=logits,
                          compute=compute)


class StageMemory:
    """The planner's estimate for any layer range of one model, in O(1) per range.

    The same bytes as the shard layout (``orchcore.shard.shard_layout``) would give, from
    prefix sums: a planner tries thousands of ranges.
    """

    def __init__(self, facts: ModelFacts, config: EngineConfig) -> None:
        self.n_layers = facts.n_layers
        self.config = config
        self._facts = facts
        self._prefix = [0, *itertools.accumulate(facts.layer_bytes)]
        self._shared = sum(t.n_bytes for t in facts.global_tensors) + facts.output_norm_bytes
        self._embd = facts.embedding_bytes
        self._untied = 0 if facts.tied_output else facts.output_bytes
        self._one_row = type_bytes(GGMLQuantizationType.F32, facts.n_embd)
        self._kv = facts.kv_bytes_per_token_per_layer()

    def weights(self, start: int, end: int) -> int:
        first, last = start == 0, end == self.n_layers
        own = self._prefix[end] - self._prefix[start] + self._shared
        if first and last:
            return own + self._embd + self._untied
        if last:  # the lm head, stored as token_embd
            return own + (self._untied or self._embd)
        # a one-row token_embd; the first stage also keeps the embedding as its input table
        return own + self._one_row + (self._embd if first else 0)

    def __call__(self, start: int, end: int) -> MemoryEstimate:
        facts = self._facts
        return _estimate(weights=self.weights(start, end), kv_per_token=self._kv * (end - start),
                         n_vocab_out=facts.n_vocab if end == self.n_layers else 1,
                         n_embd=facts.n_embd, n_ff=facts.n_ff, config=self.config)


def estimate_stage(facts: ModelFacts, layers: LayerRange, config: EngineConfig
                   ) -> MemoryEstimate:
    """The planner's figure for the stage running ``layers`` of the model ``facts``."""
    layers.check_within(facts.n_layers, str(facts.path))
    return StageMemory(facts, config)(layers.start, layers.end)


def estimate_shard(shard: ModelFacts, config: EngineConfig) -> MemoryEstimate:
    """The worker's figure for a shard file it holds (or a whole model file)."""
    weights = sum(t.n_bytes for t in shard.tensors)
    if KEY_INPUT_ROWS in shard.metadata:  # the first stage's input table, after the tensors
        weights += type_bytes(shard.metadata[KEY_INPUT_TYPE],
                              int(shard.metadata[KEY_INPUT_ROWS]) * shard.n_embd)
    return _estimate(weights=weights,
                     kv_per_token=shard.kv_bytes_per_token_per_layer() * shard.n_layers,
                     n_vocab_out=shard.n_vocab, n_embd=shard.n_embd, n_ff=shard.n_ff,
                     config=config)
