"""How much memory a stage's whole worker process needs: one pure estimate for both sides.

A memory budget is the MiB a worker's *whole process* may use: interpreter, libraries,
the shard's weights, the KV cache at the chosen context and sessions, the logits buffer
and llama.cpp's compute buffers. That is what "use at most 3 GB of this Pi" means. The
planner estimates each stage before anything is sent (``estimate_stage``); the worker
checks the same figure for the shard it received (``estimate_shard``); both end in
``_estimate``, so they agree to the byte.

The constants were measured (``bench/engine_memory.py``, docs/benchmarks.md) and are
tested against the peak RSS of real worker processes (tests/test_memory.py,
tests/test_exact_archs.py for a mixture of experts).

A mixture-of-experts stage holds every expert of its layers: the weights are the shard's
bytes, whatever a token reads (the planner's time uses ``ModelFacts.active_layer_bytes``).
Sliding-window layers hold the whole context like the others: the engine keeps
llama.cpp's ``swa_full`` (``kv_cells``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from orchcore.config import SWA_FULL, EngineConfig
from orchcore.facts import ModelFacts
from orchcore.ggufread import type_bytes
from orchcore.shard import KEY_INPUT_ROWS, KEY_INPUT_TYPE, LayerRange, shard_layout

MIB = 1 << 20
DEFAULT_RESERVE_MB = 512  # a worker without a budget leaves this much RAM to the machine
# A worker process with nothing loaded: Python, numpy, gRPC, llama.cpp's libraries. The
# planner uses a worker's own measured figure when it reports one (``DeviceFacts``); idle
# workers measure 80-110 MiB, so this is the safe side for one that does not.
PROCESS_BASELINE_BYTES = 160 * MIB
# Bytes of one vocabulary entry per session on the last stage: llama.cpp's output buffer
# (a float per row and session), the copy handed to the sampler (a float), and the
# sampler's candidate array (token id, logit and probability: 12 bytes, and its ids).
_LOGITS_BYTES_PER_SESSION = 4 + 4 + 16
_SCORED_ROW_BYTES = 4 + 8 + 8  # output buffer (f32), its float64 copy, the log-softmax
# llama.cpp's compute buffer: graph intermediates per row of a batch, in floats of width
# n_ff and n_embd, plus a fixed part (measured; see the module docstring).
_COMPUTE_FIXED_BYTES = 16 * MIB
_COMPUTE_FF_ROWS = 4
_COMPUTE_EMBD_ROWS = 8
_SWA_PAD = 256  # llama.cpp pads a window-sized cache to this many cells


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


def kv_cells(swa: bool, window: int, config: EngineConfig, swa_full: bool = SWA_FULL) -> int:
    """KV cells llama.cpp allocates for one layer: every session's context, or for a
    sliding-window layer without ``swa_full`` its window plus a batch (padded), per session.
    """
    if not swa or swa_full:
        return config.kv_tokens
    per_session = -(-(window + config.batch_tokens) // _SWA_PAD) * _SWA_PAD
    return min(config.context_tokens, per_session) * config.max_sessions


def _kv_bytes(facts: ModelFacts, config: EngineConfig) -> list[int]:
    """KV bytes of each layer of ``facts`` (a model or a shard) at ``config``."""
    per_cell = facts.kv_bytes_per_token_per_layer()
    swa = facts.swa_layers or (False,) * facts.n_layers
    return [per_cell * kv_cells(s, facts.sliding_window, config) for s in swa]


def logits_bytes(n_vocab_out: int, config: EngineConfig) -> int:
    """Every logits row the last stage may hold: llama.cpp reserves its compute graph for a
    whole chunk with every row an output (``n_ubatch`` = ``batch_tokens`` rows of floats),
    and per session a row in its output buffer, in the sampler's copy and its candidates.
    A chunk scoring its prompt rows adds ``output_rows`` rows to the output buffer and
    their float64 log-softmax (``_SCORED_ROW_BYTES`` each). A stage without the vocabulary
    (``n_vocab_out`` 1) holds none."""
    if n_vocab_out <= 1:
        return 0
    return n_vocab_out * (4 * config.batch_tokens
                          + _LOGITS_BYTES_PER_SESSION * config.max_sessions
                          + _SCORED_ROW_BYTES * config.output_rows)


def _estimate(*, weights: int, kv: int, n_vocab_out: int, n_embd: int, ffn_width: int,
              config: EngineConfig, baseline: int | None = None) -> MemoryEstimate:
    rows = config.batch_tokens
    compute = _COMPUTE_FIXED_BYTES + 4 * rows * (
        _COMPUTE_FF_ROWS * ffn_width + _COMPUTE_EMBD_ROWS * n_embd)
    return MemoryEstimate(baseline=baseline or PROCESS_BASELINE_BYTES, weights=weights,
                          kv_cache=kv, logits=logits_bytes(n_vocab_out, config),
                          compute=compute)


class StageMemory:
    """The planner's estimate for any layer range of one model, in O(1) per range.

    The same bytes as the shard layout (``orchcore.shard.shard_layout``) would give, from
    prefix sums: a planner tries thousands of ranges. Besides its layers, a shard's bytes
    depend only on whether it is first and whether it is last, so they are read once from
    the layout of one range of each kind.
    """

    def __init__(self, facts: ModelFacts, config: EngineConfig) -> None:
        self.n_layers = facts.n_layers
        self.config = config
        self._facts = facts
        self._prefix = [0, *itertools.accumulate(facts.layer_bytes)]
        self._kv_prefix = [0, *itertools.accumulate(_kv_bytes(facts, config))]
        n = facts.n_layers
        self._extra = {
            (start == 0, end == n): self._layout_bytes(start, end)
            for start, end in ((0, n), (0, 1), (n - 1, n), (1, 2)) if 0 <= start < end <= n
        }

    def _layout_bytes(self, start: int, end: int) -> int:
        """Bytes of the shard for [start, end) besides its layers."""
        layout = shard_layout(self._facts, LayerRange(start, end))
        return layout.total_tensor_bytes - (self._prefix[end] - self._prefix[start])

    def weights(self, start: int, end: int) -> int:
        extra = self._extra[start == 0, end == self.n_layers]
        return self._prefix[end] - self._prefix[start] + extra

    def __call__(self, start: int, end: int, baseline: int | None = None) -> MemoryEstimate:
        """The stage ``[start, end)`` on a worker whose idle process holds ``baseline``
        bytes (None or 0: unknown, ``PROCESS_BASELINE_BYTES``)."""
        facts = self._facts
        return _estimate(weights=self.weights(start, end),
                         kv=self._kv_prefix[end] - self._kv_prefix[start],
                         n_vocab_out=facts.n_vocab if end == self.n_layers else 1,
                         n_embd=facts.n_embd, ffn_width=facts.ffn_width, config=self.config,
                         baseline=baseline)


def estimate_stage(facts: ModelFacts, layers: LayerRange, config: EngineConfig,
                   baseline: int | None = None) -> MemoryEstimate:
    """The planner's figure for the stage running ``layers`` of the model ``facts`` on a
    worker whose idle process holds ``baseline`` bytes (None: unknown)."""
    layers.check_within(facts.n_layers, str(facts.path))
    return StageMemory(facts, config)(layers.start, layers.end, baseline)


def estimate_shard(shard: ModelFacts, config: EngineConfig) -> MemoryEstimate:
    """The worker's figure for a shard file it holds (or a whole model file)."""
    weights = sum(t.n_bytes for t in shard.tensors)
    if KEY_INPUT_ROWS in shard.metadata:  # the first stage's input table, after the tensors
        weights += type_bytes(shard.metadata[KEY_INPUT_TYPE],
                              int(shard.metadata[KEY_INPUT_ROWS]) * shard.n_embd)
    return _estimate(weights=weights, kv=sum(_kv_bytes(shard, config)),
                     n_vocab_out=shard.n_vocab, n_embd=shard.n_embd,
                     ffn_width=shard.ffn_width, config=config)
