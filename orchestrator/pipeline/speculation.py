"""Speculative decoding as the orchestrator runs it: how many tokens a session drafts per
pass, the drafts of the passes it sends itself, and what every pass cost and kept.

``ngram`` drafts a fixed K per pass by prompt lookup; ``draft:MODEL`` drafts K per pass
with a draft model on this machine (``drafting.HostDraft``), so its sessions' passes are
sent from here and the ring does not run for them (``drafts_here``). ``auto`` chooses K
with the cost model (``orchcore.speculation.cost``) over batch costs measured through this
very pipeline (``measure_costs``: a verification chunk of each size, timed by the stages
themselves) and the acceptance prompt lookup meets on the session's own answer so far
(``shadow_counts``, which needs no verification, so it is measured while speculation is
off too), starting from what earlier answers met. With the token ring, ``auto`` runs the
ring in segments of ``AUTO_SEGMENT`` tokens and decides again between them; K = 0 is plain
decoding.

The drafts a session's passes carry are a pure function of its tokens and K, whether the
last stage drafts them (the ring) or this side does: a session rebuilt after a failover
goes on with the very passes it would have made (a draft model's too: it drafts greedily
from the session's tokens alone).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchcore.errors import InvalidSettingError
from orchcore.sampling import SamplingParams
from orchcore.speculation.cost import (
    AcceptanceMeter,
    PassCosts,
    choose_draft_length,
    speculation_allowed,
)
from orchcore.speculation.decode import draft_room, shadow_counts
from orchcore.speculation.drafters import PromptLookup
from orchcore.speculation.mode import SpeculationMode

if TYPE_CHECKING:
    from orchestrator.pipeline.datapath import DataPath
    from orchestrator.pipeline.drafting import HostDraft
    from orchestrator.pipeline.session import Session

log = logging.getLogger(__name__)

AUTO_SEGMENT = 16  # tokens of a ring between two decisions of auto
AUTO_LENGTHS = (1, 2, 3, 4, 6, 8)  # K auto chooses from: batch sizes measured up to 9 rows
COST_ROWS = (1, 2, 3, 5, 9)  # verification batch sizes timed by measure_costs
COST_REPEATS = 3
SHADOW_K = 4  # drafts per pass when acceptance is measured on an answer


@dataclass(frozen=True)
class Pass:
    """One decode step of a session as it went down the stages: the pending token and its
    drafts at ``start``, and the tokens the verdict added (replayed as they were)."""

    start: int
    tokens: tuple[int, ...]
    drafted: int
    added: tuple[int, ...]


@dataclass
class SpeculationStats:
    """What a session's passes after the prompt drafted and kept, and cost."""

    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0
    drafting_passes: int = 0
    plain_pass_s: list[float] = field(default_factory=list)  # passes without drafts
    draft_s: float = 0.0  # drafting on this side (a draft model's time; lookup's is nil)

    def add(self, step: Pass, took_s: float) -> None:
        self.passes += 1
        self.drafted += step.drafted
        self.accepted += len(step.added) - 1
        self.rejections += len(step.added) - 1 < step.drafted
        self.drafting_passes += bool(step.drafted)
        if not step.drafted:
            self.plain_pass_s.append(took_s)

    @property
    def acceptance(self) -> float:
        tried = self.accepted + self.rejections
        return self.accepted / tried if tried else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return (self.accepted + self.passes) / self.passes if self.passes else 0.0


class Speculator:
    """A running model's speculation: its mode, measured batch costs, the acceptance
    earlier answers met, and for ``draft:MODEL`` the draft model (opened by the caller,
    which closes it)."""

    def __init__(self, mode: SpeculationMode, costs: PassCosts | None = None,
                 draft: HostDraft | None = None) -> None:
        if mode.kind == "draft" and draft is None:
            raise InvalidSettingError("draft:MODEL needs its draft model opened here "
                                      "(orchestrator.pipeline.drafting.HostDraft)")
        if mode.kind != "draft" and draft is not None:
            raise InvalidSettingError(f"a draft model drafts only with --speculate "
                                      f"draft:MODEL, not {mode.kind}")
        self.mode = mode
        self.costs = costs
        self.draft = draft
        self.history = AcceptanceMeter()  # every answer's shadow acceptance
        self._drafter = PromptLookup()

    @property
    def drafts_here(self) -> bool:
        """Whether this side drafts every speculating pass (a draft model): the ring must
        not run for a session that drafts."""
        return self.draft is not None

    @property
    def needs_costs(self) -> bool:
        return self.mode.kind == "auto" and self.costs is None

    def ring_segment(self) -> int | None:
        """The most tokens a ring runs before this side decides again (None: no limit)."""
        return AUTO_SEGMENT if self.mode.kind == "auto" else None

    def choose(self, session: Session) -> int:
        """Drafts per pass for ``session``'s next passes (0: plain decoding)."""
        if not self.mode.on or not speculation_allowed(session.sampling):
            return 0
        if self.mode.kind in ("ngram", "draft"):
            return self.mode.k
        if self.costs is None or (len(session.generated) < AUTO_SEGMENT // 2
                                  and not self.history.passes):
            return 0  # nothing measured yet: plain, until the answer shows what drafts meet
        meter = AcceptanceMeter(prior_kept=2 * self.history.rate,
                                prior_rejected=2 * (1 - self.history.rate))
        meter.kept, meter.rejected = shadow_counts(self._drafter, session.prompt,
                                                   session.generated, SHADOW_K)
        lengths = tuple(k for k in AUTO_LENGTHS if k <= self.mode.k)
        return choose_draft_length(meter.rate, self.costs, lengths)

    def drafts(self, session: Session, budget: int, context_tokens: int,
               batch_tokens: int) -> tuple[int, ...]:
        """The drafts of ``session``'s next pass (the last stage's rule, ``Verdicts.draft``):
        up to ``session.draft_k``, within ``budget`` tokens after the pending one."""
        room = draft_room(session.draft_k, budget, session.length, context_tokens,
                          batch_tokens)
        if room <= 0:
            return ()
        context = [*session.prompt, *session.generated]
        started = time.perf_counter()
        if self.draft is not None:
            drafts = self.draft.propose(session.id, context, room).tokens
        else:
            drafts = self._drafter.propose(context, room).tokens
        session.draft_s += time.perf_counter() - started
        return drafts

    def finished(self, session: Session) -> None:
        """Learn the acceptance ``session``'s answer met, for the answers after it; free its
        draft cache."""
        if self.draft is not None:
            self.draft.end(session.id)
        kept, rejected = shadow_counts(self._drafter, session.prompt, session.generated,
                                       SHADOW_K)
        self.history.kept += kept
        self.history.rejected += rejected
        self.history.passes += kept + rejected > 0


def measure_costs(path: DataPath, session: str, prompt: Sequence[int], batch_tokens: int,
                  sampling: SamplingParams) -> PassCosts:
    """Batch costs of this pipeline, measured: ``prompt``, then verification chunks of
    each size in ``COST_ROWS`` (up to ``batch_tokens``), all at the position after the
    prompt (each rolls the last back), timed by the stages' own compute times. The link
    is what a one-row pass takes beyond its compute. Ends ``session``."""
    rows = [n for n in COST_ROWS if n <= batch_tokens]
    start = len(prompt)
    path.wait(session, path.send(session, 0, prompt, True, sampling))
    compute: dict[int, list[float]] = {n: [] for n in rows}
    wall: list[float] = []
    try:
        for _ in range(COST_REPEATS):
            for n in rows:
                sent = time.perf_counter()
                out = path.wait(session, path.send(session, start, [prompt[-1]] * n, True,
                                                   drafted=n - 1))
                compute[n].append(sum(t.compute_ms for t in out.timings))
                if n == 1:
                    wall.append((time.perf_counter() - sent) * 1e3)
    finally:
        path.end_session(session)
    step = statistics.median(compute[1])
    costs = PassCosts({n: statistics.median(c) / step for n, c in compute.items() if n > 1},
                      step_ms=step, link_ms=max(0.0, statistics.median(wall) - step))
    log.info("batch costs measured: %s, step %.2f ms, link %.2f ms",
             {n: round(c, 2) for n, c in costs.batch_cost.items()}, step, costs.link_ms)
    return costs
