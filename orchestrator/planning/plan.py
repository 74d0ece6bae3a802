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

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Literal

from orchcore.codecs import get_codec
from orchcore.config import EngineConfig
from orchcore.devices import DeviceFacts
from orchcore.errors import PlanError
from orchcore.facts import ModelFacts
from orchcore.memory import MIB, MemoryEstimate, StageMemory
from orchcore.probe import PROBE_PREFILL_TOKENS
from orchcore.shard import LayerRange
from orchestrator.planning.speeds import head_layers, stage_layers

__all__ = ["CutChoice", "LeftOut", "Plan", "PlanOptions", "StagePlan", "active_bytes",
           "head_layers", "host_shares", "make_plan"]

GB = 1e9
Objective = Literal["latency", "throughput"]
OBJECTIVES: tuple[Objective, ...] = ("latency", "throughput")
STICKY = 0.05  # a new cut must predict more than 5% less time to be worth anything
DEFAULT_HORIZON_TOKENS = 4096  # tokens a plan is expected to serve before the next one
DEFAULT_TRANSFER_BYTES_S = 100e6  # a shard's way to a worker when nothing is measured
NOISE = 0.15  # probed speeds this close count as equal (probes of equal cores differ so)
UNMEASURED_S_PER_LAYER = 1.0  # every device equally fast when nothing is measured
DEFAULT_LINK_S = 0.0005  # a hop on a home LAN, when not measured
MIN_CONTEXT_TOKENS = 16  # the shortest context an engine takes (orchcore.config)


@dataclass(frozen=True)
class PlanOptions:
    codec: str = "f32"
    engine: EngineConfig = field(default_factory=EngineConfig)  # threads 0 = each worker's own
    objective: Objective = "latency"
    use_all: bool = False  # every device gets a stage (``--local N``: exactly N stages)
    # The cut the workers hold, as (worker id, start, end): kept while it still fits and a
    # new cut would not win back the shards it sends within ``horizon_tokens``.
    prefer: tuple[tuple[str, int, int], ...] = ()
    horizon_tokens: int = DEFAULT_HORIZON_TOKENS
    replan: bool = False  # cut anew even when keeping ``prefer`` is the better deal


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
class CutChoice:
    """Why a plan kept the cut the workers hold or took a new one, in the plan's terms.

    Seconds are per decoded token, as the search predicts them (compute and links); they are
    real seconds only when every device was measured (``measured``)."""

    kept: bool
    new_s: float  # the best new cut
    held_s: float | None  # the cut the workers hold; None when it no longer fits
    moved_bytes: int  # shard bytes the new cut sends to workers that do not hold them
    transfer_s: float  # those bytes at each receiving worker's link speed
    horizon_tokens: int
    measured: bool
    forced: bool = False  # ``--replan``
    problem: str = ""  # why the held cut cannot be kept, when it cannot

    @property
    def gain_s(self) -> float | None:
        return None if self.held_s is None else self.held_s - self.new_s

    @property
    def payback_tokens(self) -> float | None:
        """Tokens after which the new cut has won back its transfer (None: never)."""
        gain = self.gain_s
        return None if gain is None or gain <= 0 or not self.measured else \
            self.transfer_s / gain

    def describe(self) -> str:
        sent = f"{self.moved_bytes / GB:.2f} GB of shards ({self.transfer_s:.0f} s)"
        if self.held_s is None:
            return f"new cut: {self.problem}; it sends {sent}"
        if self.measured:
            times = (f"{self.held_s * 1e3:.1f} ms/token for the cut the workers hold, "
                     f"{self.new_s * 1e3:.1f} for the best new one")
        else:
            times = (f"the cut the workers hold predicts {self.held_s / self.new_s:.2f}x the "
                     f"best new one's time (speeds not measured)")
        payback = self.payback_tokens
        pays = "" if payback is None else \
            f", paid back after {payback:,.0f} tokens (horizon {self.horizon_tokens:,})"
        if self.forced:
            return f"new cut on request (--replan): {times}; it sends {sent}{pays}"
        if not self.kept:
            return f"new cut: {times}; it sends {sent}{pays}"
        if payback is None or (self.gain_s or 0.0) <= self.held_s * STICKY:
            why = "a new cut gains nothing beyond noise"
        else:
            why = (f"a new cut would send {sent}, paid back only after {payback:,.0f} "
                   f"tokens, more than the {self.horizon_tokens:,} expected")
        return f"kept the cut the workers hold: {times}; {why} (--replan cuts anew)"

    def to_json(self) -> dict:
        return {"kept": self.kept, "forced": self.forced, "new_s": self.new_s,
                "held_s": self.held_s, "moved_bytes": self.moved_bytes,
                "transfer_s": self.transfer_s, "payback_tokens": self.payback_tokens,
                "horizon_tokens": self.horizon_tokens, "measured": self.measured,
                "problem": self.problem or None}


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
    search = _Search(facts, memory, devices, budgets, options, hop_bytes)
    found = search.best()
    if found is None:
        raise PlanError(f"{_shortfall(memory, devices, budgets)} "
                        f"{_advice(facts, devices, budgets, options)}.")
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


def _alike(times: list[float]) -> list[float]:
    """Times per layer within ``NOISE`` of the fastest of a group count as that one's: two
    equal machines probed a few percent apart are equally fast. Otherwise the latency
    objective would give the one measured faster every layer but one, for a one-stream
    gain of that noise, and lose pipelined prompts and concurrent sessions. (Measured:
    probes of two idle cores of one machine came up to 14% apart.)"""
    out = list(times)
    ref = None
    for i in sorted(range(len(times)), key=times.__getitem__):
        if ref is None or times[i] > ref * (1 + NOISE):
            ref = times[i]
        out[i] = ref
    return out


Cost = tuple[float, float]  # (objective, tie-break): compared lexicographically
Assignment = tuple[tuple[int, int, int], ...]  # (device index, start, end) in stage order


class _Search:
    def __init__(self, facts: ModelFacts, memory: StageMemory, devices: Sequence[DeviceFacts],
                 budgets: list[int], options: PlanOptions, hop_bytes: int = 0) -> None:
        self.facts = facts
        self.memory = memory
        self.devices = devices
        self.budgets = budgets
        self.use_all = options.use_all
        self.latency = options.objective == "latency"
        self.n = memory.n_layers
        self.t = _alike([d.decode_s_per_layer if d.decode_s_per_layer is not None
                         else UNMEASURED_S_PER_LAYER for d in devices])
        self.link = [(d.link_s if d.link_s is not None else DEFAULT_LINK_S) + (
            math.ceil(2e3 * hop_bytes / d.bandwidth_bytes_s) / 1e3 if d.bandwidth_bytes_s
            else 0.0) for d in devices]

    def fits(self, d: int, start: int, end: int) -> bool:
        return self.memory(start, end, self.devices[d].baseline_bytes).total <= self.budgets[d]

    def stage_cost(self, d: int, start: int, end: int) -> Cost:
        time = stage_layers(self.facts, start, end) * self.t[d] + self.link[d]
        return (time, time)

    def combine(self, a: Cost, b: Cost) -> Cost:
        # Rounded to a picosecond, so float rounding never decides between equal cuts.
        if self.latency:  # total time; ties go to the smaller slowest stage
            return (round(a[0] + b[0], 12), max(a[1], b[1]))
        return (max(a[0], b[0]), round(a[1] + b[1], 12))  # slowest stage; ties: the total

    def cost(self, cut: Assignment) -> Cost:
        return functools.reduce(self.combine, (self.stage_cost(d, a, b) for d, a, b in cut))

    def held(self, prefer: Sequence[tuple[str, int, int]]) -> tuple[Assignment | None, str]:
        """The cut the workers hold as an assignment, or None and why it cannot be kept."""
        index = {d.worker_id: i for i, d in enumerate(self.devices)}
        if any(w not in index for w, _, _ in prefer):
            return None, "a worker of the last cut is gone"
        cut = tuple((index[w], a, b) for w, a, b in prefer)
        contiguous = cut[0][1] == 0 and cut[-1][2] == self.n and all(
            b == next_a for (_, _, b), (_, next_a, _) in pairwise(cut))
        distinct = len({d for d, _, _ in cut}) == len(cut)
        if not contiguous or not distinct:
            return None, "the last cut does not cover this model's layers"
        if self.use_all and len(cut) != len(self.devices):
            return None, "every worker must now have a stage"
        if not all(self.fits(d, a, b) for d, a, b in cut):
            return None, "the last cut no longer fits the workers' memory"
        return cut, ""

    def moved(self, cut: Assignment, prefer: Sequence[tuple[str, int, int]]
              ) -> tuple[int, float]:
        """Shard bytes ``cut`` sends to workers that do not hold them, and the seconds that
        takes at each worker's measured link speed."""
        held = set(prefer)
        sent, seconds = 0, 0.0
        for d, a, b in cut:
            device = self.devices[d]
            if (device.worker_id, a, b) in held:
                continue
            size = self.memory.weights(a, b)
            sent += size
            seconds += size / (device.bandwidth_bytes_s or DEFAULT_TRANSFER_BYTES_S)
        return sent, seconds

    def choose(self, found: tuple[Cost, Assignment], options: PlanOptions
               ) -> tuple[Assignment, CutChoice | None]:
        """The best cut, or the one the workers hold when moving would not pay."""
        best_cost, best = found
        prefer = options.prefer
        if not prefer:
            return best, None
        cut, problem = self.held(prefer)
        sent, seconds = self.moved(best, prefer)
        measured = all(d.decode_s_per_layer is not None for d in self.devices)
        choice = CutChoice(kept=False, new_s=best_cost[0], held_s=None, moved_bytes=sent,
                           transfer_s=seconds, horizon_tokens=options.horizon_tokens,
                           measured=measured, forced=options.replan, problem=problem)
        if cut is None or cut == best:
            return best, None if cut == best else choice
        choice = replace(choice, held_s=self.cost(cut)[0])
        if options.replan:
            return best, choice
        gain = choice.gain_s or 0.0
        payback = choice.payback_tokens
        worth = gain > choice.held_s * STICKY and (
            not measured or (payback is not None and payback <= options.horizon_tokens))
        return (best, choice) if worth else (cut, replace(choice, kept=True))

    def best(self) -> tuple[Cost, Assignment] | None:
        found: tuple[Cost, Assignment] | None = None
        count = len(self.devices)
        # Among equally good plans the first found wins: the devices in the order given.
        for first in range(count):
            for last in reversed(range(count)):
                if self.use_all and count > 1 and first == last:
                    continue
                candidate = self._with_ends(first, last)
                if candidate is not None and (found is None or candidate[0] < found[0]):
                    found = candidate
        return found

    def _with_ends(self, first: int, last: int) -> tuple[Cost, Assignment] | None:
        n = self.n
        if first == last:
            if self.fits(first, 0, n):
                return self.stage_cost(first, 0, n), ((first, 0, n),)
            return None
        # frontier[l]: the best way to run layers [0, l) with the devices seen so far
        frontier: dict[int, tuple[Cost, Assignment]] = {}
        for end in range(1, n):
            if not self.fits(first, 0, end):
                break  # memory grows with the range
            frontier[end] = (self.stage_cost(first, 0, end), ((first, 0, end),))
        for d in range(len(self.devices)):
            if d in (first, last):
                continue
            frontier = self._extend(frontier, d)
        best: tuple[Cost, Assignment] | None = None
        for start, (cost, done) in frontier.items():
            if self.fits(last, start, n):
                total = self.combine(cost, self.stage_cost(last, start, n))
                if best is None or total < best[0]:
                    best = (total, (*done, (last, start, n)))
        return best

    def _extend(self, frontier: dict[int, tuple[Cost, Assignment]], d: int
                ) -> dict[int, tuple[Cost, Assignment]]:
        """Give device ``d`` a range after each frontier point, or (unless every device
        must be used) nothing."""
        nxt: dict[int, tuple[Cost, Assignment]] = {} if self.use_all else dict(frontier)
        for start, (cost, done) in frontier.items():
            for end in range(start + 1, self.n):
                if not self.fits(d, start, end):
                    break
                total = self.combine(cost, self.stage_cost(d, start, end))
                if end not in nxt or total < nxt[end][0]:
                    nxt[end] = (total, (*done, (d, start, end)))
        return nxt

    def why_unused(self, d: int) -> str:
        baseline = self.devices[d].baseline_bytes
        one_layer = min(self.memory(s, s + 1, baseline).total
                        for s in range(1, max(2, self.n - 1)))
        if one_layer > self.budgets[d]:
            return (f"too small for one layer (needs {one_layer / MIB:.0f} MiB, may use "
                    f"{self.budgets[d] / MIB:.0f} MiB)")
        return "not needed: the plan is faster without one more hop"


def _shortfall(memory: StageMemory, devices: Sequence[DeviceFacts], budgets: list[int]
               ) -> str:
    """What is missing, in MiB: the whole model cut over every device, against the budgets."""
    n, count = memory.n_layers, min(len(devices), memory.n_layers)
    # Every stage pays the process, compute and logits overhead; the layers, the input
    # table and the head are paid once.
    per_stage = memory(1, 2).total - (memory.weights(1, 2) + memory(1, 2).kv_cache)
    need = (memory(0, n).total - per_stage) + count * per_stage
    have = sum(budgets)
    names = ", ".join(f"{d.address} {b / MIB:.0f} MiB" for d, b in zip(devices, budgets,
                                                                         strict=True))
    if need > have:
        return (f"the model does not fit: it needs about {need / MIB:.0f} MiB across "
                f"{count} worker{'s' if count != 1 else ''}, "
                f"{math.ceil((need - have) / MIB)} MiB more than their budgets ({names}).")
    return (f"the model does not fit: {have / MIB:.0f} MiB of budgets in all ({names}), but "
            f"no cut into whole layers fits each worker's share.")


def _advice(facts: ModelFacts, devices: Sequence[DeviceFacts], budgets: list[int],
            options: PlanOptions) -> str:
    """What would make the model fit, each suggestion tried first: a shorter context, fewer
    sessions, or both. More workers or memory always would."""
    engine = options.engine
    hop_bytes = get_codec(options.codec).encoded_size(1, facts.n_embd)

    def fits(context: int, sessions: int) -> bool:
        memory = StageMemory(facts, replace(engine, context_tokens=context,
                                            max_sessions=sessions))
        return _Search(facts, memory, devices, budgets, options, hop_bytes).best() is not None

    context, sessions = engine.context_tokens, engine.max_sessions
    if not fits(min(context, MIN_CONTEXT_TOKENS), 1):
        return ("Add workers or memory (a shorter context or fewer sessions would not be "
                "enough)")
    helps = []
    if (shorter := _largest(lambda c: fits(c, sessions), MIN_CONTEXT_TOKENS, context)):
        helps.append(f"shorten the context (--context, now {context}; {shorter} fits)")
    if (fewer := _largest(lambda k: fits(context, k), 1, sessions)):
        helps.append(f"hold fewer sessions (--max-sessions, now {sessions}; {fewer} "
                     f"fit{'s' if fewer == 1 else ''})")
    if not helps:  # only both together
        shorter = _largest(lambda c: fits(c, 1), MIN_CONTEXT_TOKENS, context + 1)
        helps.append(f"hold one session (--max-sessions 1) with a context of at most "
                     f"{shorter} tokens (--context)")
    return f"Add workers or memory, or {', or '.join(helps)}"


def _largest(fits: Callable[[int], bool], low: int, below: int) -> int | None:
    """The largest value in ``[low, below)`` that ``fits`` (monotone: smaller values fit
    once a value does), or None."""
    if below <= low or not fits(low):
        return None
    while below - low > 1:  # fits(low), and nothing from ``below`` on does
        middle = (low + below) // 2
        if fits(middle):
            low = middle
        else:
            below = middle
    return low
