"""The plan: which layers run where, with which engine settings. A pure value.

``make_plan(model facts, devices, options) -> Plan`` reads no file and opens no socket.
It is made once, shown to the user before anything is sent, and then deployed; nobody
re-derives it.

The cut is sized per device: each stage must fit its device's memory budget (the whole
worker process, ``orchcore.memory``), and among the cuts that fit the planner picks the
best one for the objective:

* ``latency`` (default): the least time per token of one stream, the sum of the stages'
  compute and their links. It fills the fastest devices first and may leave slow or
  small devices out: a device that only adds a hop is not used.
* ``throughput``: the smallest slowest stage, for many sessions at once.

A device's time per layer comes from ``DeviceFacts.decode_s_per_layer`` (measured); when
nothing is measured every device counts as equally fast, and so do devices measured within
``NOISE`` of each other. The last stage also runs the lm head, which costs as many layers
as its rows' bytes are worth, and the first looks up a row of the input table
(``speeds.stage_layers``): decoding reads every weight once per token. For a mixture of
experts "every weight" means the weights a token reads: each layer's shared tensors and
the ``expert_used_count`` experts the router picks (``ModelFacts.active_layer_bytes``,
what the probe's time per layer is scaled to), while memory holds every expert
(``orchcore.memory``); each stage shows both.

A stage's link costs its round trip plus a token's hidden state in and out at its
measured bandwidth (with the chosen codec), counted in whole milliseconds so that jitter
never reorders equal devices. Each stage costs its device's ``link_s`` too, the hop into
it and out of it (order-free: on a home network every hop crosses the same switch).

A new cut sends shards, so it must pay for them. Given the cut the workers already hold
(``PlanOptions.prefer``, the last plan of this model on these workers), the plan keeps it
unless the best new cut predicts a gain per token beyond measurement noise (``STICKY``)
that wins back the shards it would send, at each worker's measured link speed, within
``PlanOptions.horizon_tokens`` tokens (``CutChoice``). A predicted loss never moves
anything; ``PlanOptions.replan`` cuts anew regardless.

Search, exact: every choice of first and last device (the first holds the input table,
the last the lm head and logits), and between them a dynamic programme over contiguous
ranges that gives each remaining device either nothing or a range. Devices between the
first and the last are taken in a fixed order; with layers of equal size (every
architecture orch splits) their order changes neither memory nor time, so the result is
the optimum over all device orders (tests compare it with brute force).

Workers on one host share its RAM: each gets at most its share of the host's available
memory, in proportion to its budget.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from orchcore.codecs import get_codec
from orchcore.config import EngineConfig
from orchcore.devices import DeviceFacts
from orchcore.errors import PlanError
from orchcore.facts import ModelFacts
from orchcore.memory import MIB, MemoryEstimate, StageMemory
from orchcore.probe import PROBE_PREFILL_TOKENS
from orchcore.shard import LayerRange
from orchestrator.planning.search import (
    DEFAULT_HORIZON_TOKENS,
    OBJECTIVES,
    CutChoice,
    Objective,
    PlanOptions,
    Search,
    advice,
    shortfall,
)
from orchestrator.planning.speeds import head_layers, stage_layers

__all__ = [
    "DEFAULT_HORIZON_TOKENS",
    "OBJECTIVES",
    "CutChoice",
    "LeftOut",
    "Objective",
    "Plan",
    "PlanOptions",
    "StagePlan",
    "active_bytes",
    "head_layers",
    "host_shares",
    "make_plan",
]

@dataclass(frozen=True)
class StagePlan:
    index: int
    layers: LayerRange
    device: DeviceFacts
    engine: EngineConfig  # threads resolved for this device
    memory: MemoryEstimate
    budget: int  # the bytes this stage may use: the device's budget or its host share
    decode_s: float | None  # predicted compute per token, when the device was measured
    active_bytes: int = 0  # weight bytes one decode step reads (used experts, lm head)

    @property
    def worker(self) -> str:
        return self.device.address


@dataclass(frozen=True)
class LeftOut:
    device: DeviceFacts
    reason: str


@dataclass(frozen=True)
class Plan:
    model: Path
    n_layers: int
    stages: tuple[StagePlan, ...]
    codec: str
    objective: Objective = "latency"
    left_out: tuple[LeftOut, ...] = ()
    experts: tuple[int, int] | None = None  # (used per token, per layer): a mixture of experts
    choice: CutChoice | None = None  # kept or new, when the workers held a cut before

    @property
    def batch_tokens(self) -> int:
        return self.stages[0].engine.batch_tokens

    @property
    def context_tokens(self) -> int:
        return self.stages[0].engine.context_tokens

    @property
    def max_sessions(self) -> int:
        return self.stages[0].engine.max_sessions

    @property
    def predicted_decode_s(self) -> float | None:
        """Compute time per token of one stream (links aside), when every stage is measured."""
        times = [s.decode_s for s in self.stages]
        return None if None in times else sum(times)

    @property
    def predicted_prompt_tokens_s(self) -> float | None:
        """Prompt tokens per second through the stages in turn, when every stage is measured
        (one chunk at a time; the lm head runs once per chunk and is left out)."""
        per_token = [None if s.device.prefill_s_per_layer is None else
                     len(s.layers) * s.device.prefill_s_per_layer for s in self.stages]
        return None if None in per_token or not sum(per_token) else 1 / sum(per_token)

    def prompt_chunk(self, n_tokens: int) -> int:
        """The chunk size that brings a prompt of ``n_tokens`` through the stages soonest.

        The chunks flow through the stages concurrently: the first chunk passes every stage,
        then the slowest stage takes one chunk after the other. A stage takes ``a + b * c``
        for a chunk of ``c`` tokens, fitted to its device's two measurements (a decode step
        and a 64-token prompt per layer): small chunks fill the pipeline sooner, large ones
        waste less per chunk. Unmeasured devices: the largest chunk."""
        largest = self.batch_tokens
        costs = []
        for s in self.stages:
            decode, prefill = s.device.decode_s_per_layer, s.device.prefill_s_per_layer
            if decode is None or prefill is None or len(self.stages) == 1:
                return min(largest, max(n_tokens, 1))
            b = max(prefill * PROBE_PREFILL_TOKENS - decode, 0.0) / (PROBE_PREFILL_TOKENS - 1)
            costs.append((len(s.layers) * (decode - b), len(s.layers) * b))

        def time_to_first_token(c: int) -> float:
            per_chunk = [a + b * c for a, b in costs]
            return sum(per_chunk) + (-(-n_tokens // c) - 1) * max(per_chunk)

        sizes = {largest, *(1 << k for k in range(4, 16) if 1 << k < largest)}
        return min(sorted(sizes), key=time_to_first_token) if n_tokens > 1 else 1

    def to_json(self) -> dict:
        """The plan for scripts (``orch plan --json``): bytes, seconds, half-open ranges."""
        return {
            "model": str(self.model), "layers": self.n_layers, "codec": self.codec,
            "objective": self.objective, "context_tokens": self.context_tokens,
            "predicted_decode_s": self.predicted_decode_s,
            "predicted_prompt_tokens_s": self.predicted_prompt_tokens_s,
            "experts": None if self.experts is None else
            {"used": self.experts[0], "per_layer": self.experts[1]},
            "stages": [{"index": s.index, "worker": s.worker, "worker_id": s.device.worker_id,
                        "host": s.device.hostname, "layers": [s.layers.start, s.layers.end],
                        "memory_bytes": s.memory.total, "budget_bytes": s.budget,
                        "weights_bytes": s.memory.weights, "active_bytes": s.active_bytes,
                        "process_bytes": s.memory.baseline,
                        "process_measured": bool(s.device.baseline_bytes),
                        "threads": s.engine.threads, "predicted_decode_s": s.decode_s}
                       for s in self.stages],
            "standby": [{"worker": o.device.address, "reason": o.reason}
                        for o in self.left_out],
            "cut": None if self.choice is None else self.choice.to_json(),
        }

    def stage_of(self, address: str) -> StagePlan | None:
        return next((s for s in self.stages if s.worker == address), None)

    def describe(self) -> list[str]:
        lines = []
        if self.experts is not None:
            used, total = self.experts
            lines.append(f"mixture of experts: {used} of {total} experts per token; memory "
                         f"holds every expert, time counts the weights a token reads")
        for s in self.stages:
            speed = f", {s.decode_s * 1e3:.1f} ms/token" if s.decode_s is not None else ""
            weights = (f" (weights {s.memory.weights / MIB:.1f} MiB, a token reads "
                       f"{s.active_bytes / MIB:.1f} MiB)" if self.experts is not None else "")
            lines.append(f"stage {s.index}: layers {s.layers} on {s.device.label}: "
                         f"{s.memory.total / MIB:.0f} of {s.budget / MIB:.0f} MiB{weights}, "
                         f"{s.engine.threads} thread{'s' if s.engine.threads != 1 else ''}{speed}")
        for out in self.left_out:
            lines.append(f"standby: {out.device.label}: {out.reason}")
        decode, prompt = self.predicted_decode_s, self.predicted_prompt_tokens_s
        if decode is not None and prompt is not None:
            lines.append(f"predicted: {decode * 1e3:.1f} ms of compute per token, "
                         f"prompts at {prompt:.0f} tokens/s")
        engine = self.stages[0].engine
        lines.append(f"context {engine.context_tokens} tokens x {engine.max_sessions} "
                     f"sessions, chunks of {engine.batch_tokens}, {self.codec} between stages, "
                     f"objective {self.objective}")
        if self.choice is not None:
            lines.append(self.choice.describe())
        return lines


def make_plan(facts: ModelFacts, devices: Sequence[DeviceFacts],
              options: PlanOptions | None = None) -> Plan:
    """The best cut of ``facts`` over ``devices`` for ``options.objective``.

    Raises ``PlanError`` saying by how many MiB and on which devices when nothing fits.
    """
    options = options or PlanOptions()
    get_codec(options.codec)  # refuses an unknown codec, naming the valid ones
    if options.objective not in OBJECTIVES:
        raise PlanError(f"unknown objective {options.objective!r}; choose one of "
                        f"{', '.join(OBJECTIVES)}")
    facts.require_supported()
    _check_devices(facts, devices, options)
    memory = StageMemory(facts, options.engine)
    budgets = host_shares(devices)
    hop_bytes = get_codec(options.codec).encoded_size(1, facts.n_embd)
    search = Search(facts, memory, devices, budgets, options, hop_bytes)
    found = search.best()
    if found is None:
        raise PlanError(f"{shortfall(memory, devices, budgets)} "
                        f"{advice(facts, devices, budgets, options)}.")
    best, choice = search.choose(found, options)
    stages = []
    for i, (d, start, end) in enumerate(best):
        device = devices[d]
        engine = replace(options.engine,
                         threads=options.engine.threads or device.threads or device.cores)
        stages.append(StagePlan(
            i, LayerRange(start, end), device, engine,
            memory(start, end, device.baseline_bytes), budgets[d],
            None if device.decode_s_per_layer is None else
            stage_layers(facts, start, end) * device.decode_s_per_layer,
            active_bytes(facts, start, end)))
    used = {d for d, _, _ in best}
    left_out = tuple(LeftOut(devices[d], search.why_unused(d)) for d in range(len(devices))
                     if d not in used)
    experts = (facts.n_expert_used, facts.n_expert) if facts.n_expert else None
    return Plan(facts.path, facts.n_layers, tuple(stages), options.codec, options.objective,
                left_out, experts, choice)


def active_bytes(facts: ModelFacts, start: int, end: int) -> int:
    """Weight bytes a decode step of the stage ``[start, end)`` reads: its layers' shared
    tensors and used experts, and the lm head on the last stage."""
    head = facts.output_bytes if end == facts.n_layers else 0
    return sum(facts.active_layer_bytes[start:end]) + head


def host_shares(devices: Sequence[DeviceFacts]) -> list[int]:
    """Each device's usable bytes: its budget, capped by its share of a shared host's RAM."""
    by_host: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(devices):
        by_host[d.host_id].append(i)
    budgets = [d.memory_budget_bytes for d in devices]
    for members in by_host.values():
        if len(members) < 2:
            continue
        ram = max(devices[i].ram_available_bytes for i in members)
        total = sum(budgets[i] for i in members)
        if total > ram:
            for i in members:
                budgets[i] = budgets[i] * ram // total
    return budgets


def _check_devices(facts: ModelFacts, devices: Sequence[DeviceFacts],
                   options: PlanOptions) -> None:
    if not devices:
        raise PlanError("no workers to run the model on")
    if options.use_all and len(devices) > facts.n_layers:
        raise PlanError(f"{len(devices)} workers for {facts.n_layers} layers: every worker "
                        f"needs at least one layer; use at most {facts.n_layers} workers")
    seen: dict[str, str] = {}
    for d in devices:
        if d.worker_id in seen:
            raise PlanError(f"{seen[d.worker_id]} and {d.address} are the same worker "
                            f"(id {d.worker_id[:8]}); list each worker once")
        seen[d.worker_id] = d.address


