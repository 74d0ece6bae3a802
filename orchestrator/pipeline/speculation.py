"""Speculative decoding as the orchestrator runs it: how many tokens a session drafts per
pass, the drafts of the passes it sends itself, and what every pass cost and kept.

``ngram`` drafts a fixed K per pass by prompt lookup; ``draft:MODEL`` drafts K per pass
with a draft model on this machine (``drafting.HostDraft``), so its sessions' passes are
sent from here and the ring does not run for them (``drafts_here``). ``auto`` chooses K by
replaying the latest answers' passes for each K (``cost.replayed_speedup``) over batch
costs measured through this very pipeline (``measure_costs``: a verification chunk of each
size, timed by the stages themselves): what prompt lookup proposed at each position of the
answer so far, against the tokens the target chose there (``decode.lookaheads``, which
needs no verification, so it is measured while speculation is off too), after what earlier
answers met. With the token ring, ``auto`` runs the ring in segments of ``AUTO_SEGMENT``
tokens and decides again between them; K = 0 is plain decoding.

The drafts a session's passes carry are a pure function of its tokens and K, whether the
last stage drafts them (the ring) or this side does: a session rebuilt after a failover
goes on with the very passes it would have made (a draft model's too: it drafts greedily
from the session's tokens alone).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchcore.errors import InvalidSettingError
from orchcore.sampling import SamplingParams
from orchcore.speculation.cost import PassCosts, choose_by_replay, speculation_allowed
from orchcore.speculation.decode import Lookahead, draft_room, lookaheads
from orchcore.speculation.drafters import PromptLookup
from orchcore.speculation.mode import SpeculationMode

if TYPE_CHECKING:
    from orchestrator.pipeline.datapath import DataPath
    from orchestrator.pipeline.drafting import HostDraft
    from orchestrator.pipeline.session import Session

log = logging.getLogger(__name__)

AUTO_SEGMENT = 8  # tokens of a ring between two decisions of auto: a burst of good drafts
#                   ends without warning, and a long K costs c(K+1) a token until then
AUTO_LENGTHS = (1, 2, 3, 4)  # K auto chooses from: past 4, a burst gains little more on a
#                              CPU (c(9) is 1.5-2x c(5)) and its end costs that much more
COST_ROWS = (1, 2, 3, 5, 9)  # verification batch sizes timed by measure_costs
COST_REPEATS = 3
REPLAY_WINDOW = 32  # positions of the latest answers auto replays to choose K: recent
#                     ones only, so that the end of a burst shows within a segment or two
REPLAY_MIN = 4  # positions measured before auto speculates at all
REPLAY_DEPTH = max(AUTO_LENGTHS)  # the longest draft


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
    overlapped: int = 0  # passes sent ahead of the verdict before them, which kept them
    plain_pass_s: list[float] = field(default_factory=list)  # passes without drafts
    draft_s: float = 0.0  # drafting on this side (a draft model's time; lookup's is nil)

    def add(self, step: Pass, took_s: float, *, overlapped: bool = False) -> None:
        self.passes += 1
        self.overlapped += overlapped
        self.drafted += step.drafted
        self.accepted += len(step.added) - 1
        self.rejections += len(step.added) - 1 < step.drafted
        self.drafting_passes += bool(step.drafted)
        if not step.drafted and not overlapped:
            self.plain_pass_s.append(took_s)

    @property
    def acceptance(self) -> float:
        tried = self.accepted + self.rejections
        return self.accepted / tried if tried else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return (self.accepted + self.passes) / self.passes if self.passes else 0.0

    def plain_estimate_s(self, costs: PassCosts | None) -> float | None:
        """What one token would have taken without speculation: the median pass of this
        answer that carried no drafts and went one at a time, else the measured one-row
        pass; None when neither is known."""
        if self.plain_pass_s:
            return statistics.median(self.plain_pass_s)
        if costs is not None:
            return (costs.step_ms + costs.link_ms) / 1e3
        return None

    def summary(self, mode: str, decode_tokens: int, decode_s: float,
                costs: PassCosts | None) -> dict:
        """What ``--stats``, the serve page and ``/api/cluster`` show of an answer's
        speculation: drafts kept, acceptance, tokens per pass, passes overlapped, and the
        speedup against the plain estimate (None when unknown)."""
        plain_s = self.plain_estimate_s(costs)
        actual_s = decode_s / decode_tokens if decode_tokens else None
        return {"mode": mode, "passes": self.passes, "drafted": self.drafted,
                "accepted": self.accepted, "acceptance": round(self.acceptance, 4),
                "tokens_per_pass": round(self.tokens_per_pass, 4),
                "overlapped": self.overlapped,
                "plain_ms_per_token": plain_s * 1e3 if plain_s else None,
                "speedup": plain_s / actual_s if plain_s and actual_s else None}


class Speculator:
    """A running model's speculation: its mode, measured batch costs, the acceptance
    earlier answers met, and for ``draft:MODEL`` the draft model (opened by the caller,
    which closes it)."""

    def __init__(self, mode: SpeculationMode, costs: PassCosts | None = None,
                 draft: HostDraft | None = None) -> None:
        if mode.model_drafts and draft is None:
            raise InvalidSettingError(f"{mode.kind}: needs its draft model opened here "
                                      "(orchestrator.pipeline.drafting.HostDraft)")
        if not mode.model_drafts and draft is not None:
            raise InvalidSettingError(f"a draft model drafts only with --speculate "
                                      f"draft:MODEL, not {mode.kind}")
        self.mode = mode
        self.costs = costs
        self.draft = draft
        self.recent: deque[Lookahead] = deque(maxlen=REPLAY_WINDOW)  # earlier answers'
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
        if self.mode.kind == "ngram" or self.mode.model_drafts:
            return self.mode.k
        if self.costs is None:
            return 0
        window = self._window(session)
        if len(window) < REPLAY_MIN:
            return 0  # nothing measured yet: plain, until the answer shows what drafts meet
        lengths = tuple(k for k in AUTO_LENGTHS if k <= self.mode.k)
        return choose_by_replay(window, self.costs, lengths)

    def _window(self, session: Session) -> list[Lookahead]:
        """The latest ``REPLAY_WINDOW`` positions with what prompt lookup proposed there:
        earlier answers', then this one's (kept as they are measured; the last few, whose
        following tokens are not all known yet, measured afresh each time)."""
        session.lookaheads += lookaheads(self._drafter, session.prompt, session.generated,
                                         len(session.lookaheads), REPLAY_DEPTH)
        fresh = lookaheads(self._drafter, session.prompt, session.generated,
                           len(session.lookaheads), REPLAY_DEPTH, partial=True)
        return [*self.recent, *session.lookaheads, *fresh][-REPLAY_WINDOW:]

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
        """Learn what drafts met on ``session``'s answer, for the answers after it; free its
        draft cache."""
        if self.draft is not None:
            self.draft.end(session.id)
        if self.mode.kind == "auto" and session.generated:
            self.recent.extend(self._window(session)[-len(session.generated):])


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
