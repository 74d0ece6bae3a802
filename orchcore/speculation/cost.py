"""Whether speculation pays here, and how many tokens to draft: a pure cost model.

With per-token acceptance ``a`` and ``k`` drafts, a pass yields on average
``E = (1 - a^(k+1)) / (1 - a)`` tokens (the kept drafts and the target's own). A pass
costs ``c(k+1)`` single steps of compute (one ``llama_decode`` of k+1 positions, measured
on this machine), plus the time on the links and the drafting time. Synchronous passes:

    speedup = E * (step + link) / (c(k+1) * step + link + k * draft)

which is ``E / c(k+1)`` with no link and free drafts. Even perfect drafts (a = 1) gain at
most ``(k+1) / c(k+1)``: the batch-cost ceiling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from orchcore.errors import InvalidSettingError
from orchcore.sampling import SamplingParams

if TYPE_CHECKING:
    from orchcore.speculation.decode import Lookahead

DRAFT_LENGTHS = (1, 2, 3, 4, 6, 8, 12, 16)
MIN_GAIN = 1.05  # below this predicted speedup speculation is off (noise, drafting risk)


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens per pass: kept drafts plus the target's own token."""
    if not 0.0 <= acceptance <= 1.0 or k < 0:
        raise InvalidSettingError(f"acceptance must be in [0, 1] and k >= 0, got "
                                  f"{acceptance!r} and {k!r}")
    if acceptance == 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


@dataclass(frozen=True)
class PassCosts:
    """What a pass costs on this machine and chain. Units in the names."""

    batch_cost: Mapping[int, float]  # rows -> one llama_decode of that many, in single steps
    step_ms: float = 1.0  # one single-row step through every stage (compute only)
    link_ms: float = 0.0  # a pass's transport over all its hops, out and back
    draft_ms: float = 0.0  # drafting one token

    def __post_init__(self) -> None:
        if not self.batch_cost or min(self.batch_cost) < 1 or any(
                c <= 0 for c in self.batch_cost.values()):
            raise InvalidSettingError(f"batch costs need sizes >= 1 with costs > 0, got "
                                      f"{dict(self.batch_cost)}")
        if self.step_ms <= 0 or self.link_ms < 0 or self.draft_ms < 0:
            raise InvalidSettingError("step_ms must be > 0, link_ms and draft_ms >= 0")

    def rows_cost(self, rows: int) -> float:
        """c(rows): measured, else interpolated linearly (c(1) = 1; past the largest
        measured size, growing with its last measured slope)."""
        known = {1: 1.0, **self.batch_cost}
        sizes = sorted(known)
        if rows in known:
            return known[rows]
        if rows > sizes[-1]:
            a, b = (sizes[-2], sizes[-1]) if len(sizes) > 1 else (sizes[-1], sizes[-1])
            slope = (known[b] - known[a]) / (b - a) if b > a else 1.0
            return known[b] + slope * (rows - b)
        return float(np.interp(rows, sizes, [known[s] for s in sizes]))

    def ceiling(self, k: int) -> float:
        """The batch-cost ceiling (k+1) / c(k+1): the most perfect drafts could gain."""
        return (k + 1) / self.rows_cost(k + 1)


def ahead_pass_ms(costs: PassCosts, rows: int, stages: int) -> float:
    """The time between two passes of ``rows`` rows when the second was sent ahead of the
    verdict on the first and its bet won. With a bet in flight for every stage before the
    last (``worker/ring.py``), each stage works on another pass at once: a pass leaves the
    pipeline every stage's share of the compute, or every hop's share of the rest of the
    trip, whichever is longer (stages of equal compute)."""
    compute = costs.rows_cost(rows) * costs.step_ms
    if stages < 2:
        return compute + costs.link_ms
    return max(compute / stages, (compute * (stages - 1) / stages + costs.link_ms)
               / (stages - 1))


def predicted_speedup(acceptance: float, k: int, costs: PassCosts, stages: int = 0) -> float:
    """Speculative tokens/s over plain tokens/s: synchronous passes, or with ``stages``
    (two or more) passes sent ahead, each winning its bet when all k drafts and the guessed
    token are kept (probability ``acceptance ** (k + 1)``) and then overlapping the pass
    before it (``ahead_pass_ms``); a lost bet costs only what idle stages computed."""
    if k == 0:
        return 1.0
    plain = costs.step_ms + costs.link_ms
    spec = costs.rows_cost(k + 1) * costs.step_ms + costs.link_ms
    if stages >= 2:
        won = acceptance ** (k + 1)
        spec = won * ahead_pass_ms(costs, k + 1, stages) + (1 - won) * spec
    return expected_tokens(acceptance, k) * plain / (spec + k * costs.draft_ms)


def choose_draft_length(acceptance: float, costs: PassCosts,
                        lengths: tuple[int, ...] = DRAFT_LENGTHS,
                        min_gain: float = MIN_GAIN, stages: int = 0) -> int:
    """The draft length with the best predicted speedup (passes sent ahead over
    ``stages``, when given), or 0 (speculation off) when even that gains less than
    ``min_gain``."""
    def gain(k: int) -> float:
        return predicted_speedup(acceptance, k, costs, stages)

    best = max(lengths, key=lambda k: (gain(k), -k))
    return best if gain(best) >= min_gain else 0


def replayed_speedup(looks: Sequence[Lookahead], k: int, costs: PassCosts) -> float:
    """Speculative over plain tokens/s, had the passes over ``looks`` (what the drafter
    proposed at each position of an answer, and what the target then chose) drafted up to
    ``k``, one pass at a time: each pass keeps the drafts that matched and adds one, and
    costs ``c(rows)`` steps and the link. Measured, not modelled: bursts of good drafts and
    positions with no proposal count as they came. Passes sent ahead are not counted: what
    they gain is a bonus on top, and their lost bets are not free."""
    if k == 0 or not looks:
        return 1.0
    tokens, spent, i = 0, 0.0, 0
    while i < len(looks):
        look = looks[i]
        drafted = min(k, look.proposed)
        kept = min(look.matched, drafted)
        spent += costs.rows_cost(drafted + 1) * costs.step_ms + costs.link_ms
        spent += drafted * costs.draft_ms
        tokens += kept + 1
        i += kept + 1
    return tokens * (costs.step_ms + costs.link_ms) / spent


def choose_by_replay(looks: Sequence[Lookahead], costs: PassCosts,
                     lengths: tuple[int, ...] = DRAFT_LENGTHS,
                     min_gain: float = MIN_GAIN) -> int:
    """The draft length whose replay over ``looks`` gains most, or 0 (speculation off)
    when even that gains less than ``min_gain``."""
    def gain(k: int) -> float:
        return replayed_speedup(looks, k, costs)

    best = max(lengths, key=lambda k: (gain(k), -k))
    return best if gain(best) >= min_gain else 0


def speculation_allowed(params: SamplingParams) -> bool:
    """Whether the acceptance rule keeps this session's output exact (``accept``) and gives
    what it asked for: not with repeat penalties (each row's history differs), a grammar
    (the verdict does not apply it) or logprobs (given for plain steps only). Such a
    session decodes one token a pass."""
    return not (params.penalised or params.grammar or params.logprobs)


@dataclass
class AcceptanceMeter:
    """Per-token acceptance, measured. A pass is a run of trials that stops at the first
    rejection, so the estimate is kept / (kept + rejections), with a weak prior
    (``prior_kept`` of ``prior_kept + prior_rejected``) until passes come in."""

    prior_kept: float = 1.0
    prior_rejected: float = 1.0
    kept: int = field(default=0, init=False)
    rejected: int = field(default=0, init=False)
    drafted: int = field(default=0, init=False)
    passes: int = field(default=0, init=False)

    def record(self, drafted: int, accepted: int) -> None:
        if not 0 <= accepted <= drafted:
            raise InvalidSettingError(f"accepted {accepted} of {drafted} drafts")
        if drafted == 0:
            return  # nothing was tried
        self.passes += 1
        self.drafted += drafted
        self.kept += accepted
        self.rejected += accepted < drafted

    @property
    def rate(self) -> float:
        kept = self.kept + self.prior_kept
        return kept / (kept + self.rejected + self.prior_rejected)
