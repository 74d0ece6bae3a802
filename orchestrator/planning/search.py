"""The planner's search: the options a plan is made with, the exact search over cuts and
devices (``Search``), the choice between the cut the workers hold and a new one
(``CutChoice``), and what to say when nothing fits (``shortfall``, ``advice``). Pure.
``orchestrator.planning.plan`` turns its result into a ``Plan``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Literal

from orchcore.codecs import get_codec
from orchcore.config import EngineConfig
from orchcore.devices import DeviceFacts
from orchcore.facts import ModelFacts
from orchcore.memory import MIB, StageMemory
from orchestrator.planning.speeds import stage_layers

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


def alike(times: list[float]) -> list[float]:
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


class Search:
    def __init__(self, facts: ModelFacts, memory: StageMemory, devices: Sequence[DeviceFacts],
                 budgets: list[int], options: PlanOptions, hop_bytes: int = 0) -> None:
        self.facts = facts
        self.memory = memory
        self.devices = devices
        self.budgets = budgets
        self.use_all = options.use_all
        self.latency = options.objective == "latency"
        self.n = memory.n_layers
        self.t = alike([d.decode_s_per_layer if d.decode_s_per_layer is not None
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


def shortfall(memory: StageMemory, devices: Sequence[DeviceFacts], budgets: list[int]
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


def advice(facts: ModelFacts, devices: Sequence[DeviceFacts], budgets: list[int],
            options: PlanOptions) -> str:
    """What would make the model fit, each suggestion tried first: a shorter context, fewer
    sessions, or both. More workers or memory always would."""
    engine = options.engine
    hop_bytes = get_codec(options.codec).encoded_size(1, facts.n_embd)

    def fits(context: int, sessions: int) -> bool:
        memory = StageMemory(facts, replace(engine, context_tokens=context,
                                            max_sessions=sessions))
        return Search(facts, memory, devices, budgets, options, hop_bytes).best() is not None

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
