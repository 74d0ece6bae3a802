"""How much memory a stage's whole worker process needs: one pure estimate for both sides.

A memory budget is the MiB a worker's *whole process* may use: interpreter, libraries,
the shard's weights, the KV cache at the chosen context and sessions, the logits buffer
and llama.cpp's compute buffers. That is what "use at most 3 GB of this Pi" means. The
planner estimates each stage before anything is sent (``estimate_stage``); the worker
checks the same figure for the shard it received (``estimate_shard``); both end in
``_estimate``, so they agree to the byte.

The constants were measured (``bench/stage_memory.py``, docs/benchmarks.md) and are
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
from orchcore.speculation.mode import MAX_K
from orchcore.stagerole import StageRole

MIB = 1 << 20
DEFAULT_RESERVE_MB = 512  # a worker without a budget leaves this much RAM to the machine
# A worker process with nothing loaded: Python, numpy, gRPC, llama.cpp's libraries. The
# planner uses a worker's own measured figure when it reports one (``DeviceFacts``); idle
# workers measure 80-110 MiB, so this is the safe side for one that does not.
PROCESS_BASELINE_BYTES = 160 * MIB
# A serving worker beyond its idle figure: gRPC's streams and message buffers, TLS, the
# stage's threads and their heap arenas (measured 21-45 MiB over the four models of
# bench/stage_memory.py; docs/benchmarks.md).
_SERVING_BYTES = 48 * MIB
# Bytes of one vocabulary entry per session on the last stage: llama.cpp's output buffer
# (a float per row and session), the copy handed to the sampler (a float), and the
# sampler's candidate array (token id, logit and probability: 12 bytes, and its ids).
_LOGITS_BYTES_PER_SESSION = 4 + 4 + 16
# A shard that carries the tokenizer (the last one): llama.cpp's vocabulary (each piece's
# text, score and attributes, the text-to-id map, the piece cache, BPE merges) and the
# header's arrays, mapped with the file. Measured: 190 (Gemma 3, 262k pieces) to 335
# (SmolLM2, 49k pieces and 49k merges) bytes per piece; the excess of the one is within the
# slack of the other.
_VOCAB_BYTES_PER_TOKEN = 224
# A row a chunk scores (prompt logprobs), embeds or verifies (a draft): llama.cpp's output
# buffer (f32) and the copy the engine returns; the log-softmax then runs one row at a time.
_SCORED_ROW_BYTES = 4 + 4
# A speculative verification chunk: the pending token and up to MAX_K drafts, logits for
# every row. A worker is not told whether its run speculates, so a last stage counts them.
VERIFY_ROWS = MAX_K + 1
# A full chunk's hidden states passing through a serving worker, in copies of
# batch_tokens x n_embd floats: a stage that receives them holds the message, its parse
# and the batch llama.cpp reads; one that sends them the engine's copy, the encoded bytes,
# the message and gRPC's buffers. Measured on the 8B-shaped model (4 MiB a copy) during a
# 256-row chunk, beyond the compute buffer: middle stage 33-35 MiB, first 19-25, last
# 13-16; the 1B (2 MiB a copy): first 11, last 8.
_WIRE_COPIES_IN = 4
_WIRE_COPIES_OUT = 6
# llama.cpp's compute buffer: graph intermediates per row of a batch, in floats of width
# n_ff and n_embd (the pages a full chunk touches; the buffer reserved is larger).
_COMPUTE_FF_ROWS = 4
_COMPUTE_EMBD_ROWS = 8
_SWA_PAD = 256  # llama.cpp pads a window-sized cache to this many cells


@dataclass(frozen=True)
class MemoryEstimate:
    """A stage's whole worker process at its peak, by term (bytes).

    The first stage's input table is mapped whole while llama.cpp loads the shard (it
    maps the file and reads it all in) and let go before the KV cache is made, so it
    competes with the terms that come after the load rather than adding to them."""

    baseline: int  # the idle process (measured by the worker, else assumed)
    weights: int  # the shard's tensors llama.cpp holds
    kv_cache: int
    logits: int
    compute: int
    input_table: int = 0  # the first stage's token embeddings: read per row once loaded
    vocab: int = 0  # the tokenizer a last stage holds
    serving: int = _SERVING_BYTES  # gRPC, TLS, threads beyond the idle figure
    hidden: int = 0  # a chunk's hidden states received and sent, with their copies

    @property
    def total(self) -> int:
        after_load = self.kv_cache + self.logits + self.compute + self.vocab + self.hidden
        return self.baseline + self.serving + self.weights + max(self.input_table, after_load)

    def describe(self) -> str:
        def mib(n: int) -> str:
            return f"{n / MIB:.0f}"

        extra = (f", input table {mib(self.input_table)} while loading" if self.input_table
                 else "") + (f", vocabulary {mib(self.vocab)}" if self.vocab else "") + (
                 f", hidden states {mib(self.hidden)}" if self.hidden else "")
        return (f"{mib(self.total)} MiB (weights {mib(self.weights)}, KV {mib(self.kv_cache)}, "
                f"logits {mib(self.logits)}, compute {mib(self.compute)}{extra}, process "
                f"{mib(self.baseline)} + {mib(self.serving)} serving)")


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
    """Every logits row the last stage holds: per session a row in llama.cpp's output
    buffer, in the sampler's copy and its candidates (a decode batch has a row per session;
    the graph keeps only the rows asked for), and the rows of the widest chunk that returns
    more than one: the rows it may score (``output_rows``: prompt logprobs) or a
    speculative verification chunk (``VERIFY_ROWS``). llama.cpp's output buffer keeps the
    widest size it had. A stage without the vocabulary (``n_vocab_out`` 1) holds none."""
    if n_vocab_out <= 1:
        return 0
    return n_vocab_out * (_LOGITS_BYTES_PER_SESSION * config.max_sessions
                          + _SCORED_ROW_BYTES * _output_rows(config))


def _output_rows(config: EngineConfig) -> int:
    """The most rows one chunk at the last stage asks logits (or embeddings) for."""
    return min(config.batch_tokens, max(config.output_rows, VERIFY_ROWS))


def compute_bytes(n_embd: int, ffn_width: int, config: EngineConfig, *, n_vocab_out: int,
                  n_layers: int, n_expert_used: int = 0) -> int:
    """The pages of llama.cpp's compute buffer a full chunk touches: intermediates per row
    in floats of width n_embd and n_ff, and in a mixture of experts each used expert's
    output before they are summed (n_embd wide: the Qwen3-30B-A3B shape touched 56 MiB for
    a 256-row chunk, 40 of them the n_ff-wide part, 16 the 8 experts' outputs). On the last
    stage the last layer runs its feed-forward only on the rows asked for (llama.cpp drops
    the others before it), so a last stage of one layer takes the n_ff-wide part for those
    rows only; and the logits of the widest chunk of outputs are a tensor of that buffer
    too, which a narrow stage's intermediates do not cover (Gemma 3's one-layer last stage:
    17 rows of 262k floats)."""
    rows, last = config.batch_tokens, n_vocab_out > 1
    ff_rows = min(rows, max(_output_rows(config), config.max_sessions)) \
        if last and n_layers == 1 else rows
    ff = _COMPUTE_FF_ROWS * ffn_width + n_expert_used * n_embd
    layers = 4 * (rows * _COMPUTE_EMBD_ROWS * n_embd + ff_rows * ff)
    return max(layers, 4 * n_vocab_out * _output_rows(config)) if last else layers


def hidden_bytes(n_embd: int, config: EngineConfig, *, first: bool, last: bool) -> int:
    """A full chunk's hidden states in a serving worker: received unless ``first``, sent
    unless ``last``, each with its copies (``_WIRE_COPIES_IN``, ``_WIRE_COPIES_OUT``)."""
    copies = (0 if first else _WIRE_COPIES_IN) + (0 if last else _WIRE_COPIES_OUT)
    return copies * 4 * config.batch_tokens * n_embd


def _estimate(*, weights: int, input_table: int, kv: int, n_vocab_out: int, n_embd: int,
              ffn_width: int, n_expert_used: int, n_layers: int, first: bool,
              config: EngineConfig, baseline: int | None = None) -> MemoryEstimate:
    compute = compute_bytes(n_embd, ffn_width, config, n_vocab_out=n_vocab_out,
                            n_layers=n_layers, n_expert_used=n_expert_used)
    return MemoryEstimate(baseline=baseline or PROCESS_BASELINE_BYTES, weights=weights,
                          kv_cache=kv, logits=logits_bytes(n_vocab_out, config),
                          compute=compute, input_table=input_table,
                          hidden=hidden_bytes(n_embd, config, first=first,
                                              last=n_vocab_out > 1),
                          vocab=_VOCAB_BYTES_PER_TOKEN * n_vocab_out if n_vocab_out > 1 else 0)


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

    def _layout_bytes(self, start: int, end: int) -> tuple[int, int]:
        """Tensor bytes of the shard for [start, end) besides its layers, and its input
        table's."""
        layout = shard_layout(self._facts, LayerRange(start, end))
        table = layout.input_table.n_bytes if layout.input_table else 0
        return (layout.total_tensor_bytes - table - (self._prefix[end] - self._prefix[start]),
                table)

    def weights(self, start: int, end: int) -> int:
        """The tensor bytes llama.cpp holds for ``[start, end)`` (no input table)."""
        extra, _ = self._extra[start == 0, end == self.n_layers]
        return self._prefix[end] - self._prefix[start] + extra

    def __call__(self, start: int, end: int, baseline: int | None = None) -> MemoryEstimate:
        """The stage ``[start, end)`` on a worker whose idle process holds ``baseline``
        bytes (None or 0: unknown, ``PROCESS_BASELINE_BYTES``)."""
        facts = self._facts
        return _estimate(weights=self.weights(start, end),
                         input_table=self._extra[start == 0, end == self.n_layers][1],
                         kv=self._kv_prefix[end] - self._kv_prefix[start],
                         n_vocab_out=facts.n_vocab if end == self.n_layers else 1,
                         n_embd=facts.n_embd, ffn_width=facts.ffn_width,
                         n_expert_used=facts.n_expert_used, n_layers=end - start,
                         first=start == 0, config=self.config, baseline=baseline)


def estimate_stage(facts: ModelFacts, layers: LayerRange, config: EngineConfig,
                   baseline: int | None = None) -> MemoryEstimate:
    """The planner's figure for the stage running ``layers`` of the model ``facts`` on a
    worker whose idle process holds ``baseline`` bytes (None: unknown)."""
    layers.check_within(facts.n_layers, str(facts.path))
    return StageMemory(facts, config)(layers.start, layers.end, baseline)


def estimate_shard(shard: ModelFacts, config: EngineConfig, baseline: int | None = None
                   ) -> MemoryEstimate:
    """The worker's figure for a shard file it holds (or a whole model file), in a process
    that holds ``baseline`` bytes with nothing loaded (None or 0: unknown)."""
    table = 0
    if KEY_INPUT_ROWS in shard.metadata:  # the first stage's input table, after the tensors
        table = type_bytes(shard.metadata[KEY_INPUT_TYPE],
                           int(shard.metadata[KEY_INPUT_ROWS]) * shard.n_embd)
    return _estimate(weights=sum(t.n_bytes for t in shard.tensors), input_table=table,
                     kv=sum(_kv_bytes(shard, config)),
                     n_vocab_out=shard.n_vocab, n_embd=shard.n_embd,
                     ffn_width=shard.ffn_width, n_expert_used=shard.n_expert_used,
                     n_layers=shard.n_layers,
                     first=StageRole.of(shard).is_first, config=config, baseline=baseline)
