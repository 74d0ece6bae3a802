"""What an answer yields: its text in pieces, a notice when it went on after a failed
worker, and how it finished (``RunningModel.generate``'s events)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from orchcore.sampling import TokenLogprobs
from orchestrator.pipeline.sessionstate import GenerationStats, Session
from orchestrator.planning.plan import Plan

FinishReason = Literal["length", "stop", "end"]  # max tokens or context; stop text; EOG


@dataclass(frozen=True)
class TextPiece:
    """Text of the answer, and the generated tokens it is the text of (those since the
    previous piece), with their logprobs when the session asked for them."""

    text: str
    tokens: tuple[int, ...] = ()
    scores: tuple[TokenLogprobs | None, ...] = ()


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    stats: GenerationStats
    session: Session


@dataclass(frozen=True)
class Failover:
    """A worker failed mid-answer; the model was planned and deployed again without it,
    the live sessions were replayed, and the answer goes on."""

    failed: tuple[str, ...]  # the workers left out
    reason: str  # the error that started it
    plan: Plan  # the plan the answer goes on with
    sessions: int  # sessions replayed onto it
    took_s: float  # from the failure being known to the pipeline being ready again

    def describe(self) -> str:
        stages = ", ".join(f"{s.layers} on {s.worker}" for s in self.plan.stages)
        return (f"{self.reason}; went on without {', '.join(self.failed) or 'it'} after "
                f"{self.took_s:.1f} s ({len(self.plan.stages)} stages: {stages}; "
                f"{self.sessions} session(s) replayed)")


Event = TextPiece | Failover | Finished
