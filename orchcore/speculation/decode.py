"""The speculative decoding loop over one session of a target: draft, verify, accept,
roll back. With no drafter (or k = 0) it is plain one-token decoding, the same code path.

The target is anything that runs consecutive positions of one session and can drop a
suffix: a whole model in a ``StageEngine`` (``EngineTarget``), a chain of engines, later
the pipeline.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from orchcore.engine import StageEngine
from orchcore.errors import InvalidSettingError
from orchcore.sampling import RANDOM_SEED, SamplingParams
from orchcore.speculation.accept import (
    Verdict,
    greedy_verdict,
    speculative_verdict,
    target_probs,
)
from orchcore.speculation.cost import speculation_allowed
from orchcore.speculation.drafters import NO_DRAFT, Draft, Drafter


class Target(Protocol):
    context_tokens: int  # positions one session may hold
    batch_tokens: int  # most positions one forward may carry

    def forward(self, start: int, tokens: Sequence[int], all_rows: bool) -> np.ndarray:
        """Logits of every row (``all_rows``) or of the last, for positions from ``start``."""
        ...

    def rollback(self, length: int) -> None: ...


class EngineTarget:
    """One session of a whole model in a ``StageEngine``."""

    def __init__(self, engine: StageEngine, session: str = "target") -> None:
        self.engine, self.session = engine, session
        self.context_tokens = engine.config.context_tokens
        self.batch_tokens = engine.config.batch_tokens

    def forward(self, start: int, tokens: Sequence[int], all_rows: bool) -> np.ndarray:
        return self.engine.forward(self.session, range(start, start + len(tokens)),
                                   tokens=list(tokens), all_logits=all_rows)

    def rollback(self, length: int) -> None:
        self.engine.rollback(self.session, length)


@dataclass
class DecodeStats:
    tokens: int = 0
    passes: int = 0  # passes after the prompt, each one llama_decode per stage
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # passes that refused a draft
    drafting_passes: int = 0  # passes that carried drafts (the rest were plain steps)

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.passes if self.passes else 0.0

    @property
    def acceptance(self) -> float:
        """Per-token acceptance: a pass tries its drafts in order until the first refusal,
        so kept / (kept + refusals) (``cost.AcceptanceMeter`` without the prior)."""
        tried = self.accepted + self.rejections
        return self.accepted / tried if tried else 0.0


class Judge:
    """The acceptance rule of one session: greedy, or speculative sampling with its own
    seeded generator."""

    def __init__(self, params: SamplingParams) -> None:
        if not speculation_allowed(params):
            raise InvalidSettingError("repeat penalties, grammars and logprobs are not "
                                      "supported with speculation; set repeat_penalty to 1, "
                                      "drop them, or turn speculation off")
        self.params = params
        self.rng = np.random.default_rng(None if params.seed == RANDOM_SEED else params.seed)

    def __call__(self, draft: Draft, logits: np.ndarray) -> Verdict:
        if self.params.greedy:
            return greedy_verdict(draft.tokens, logits)
        return speculative_verdict(draft.tokens, target_probs(logits, self.params),
                                   draft.probs, self.rng)


def draft_room(k: int, budget: int, position: int, context_tokens: int,
               batch_tokens: int) -> int:
    """How many drafts a pass whose pending token sits at ``position`` may carry: at most
    ``k``, no more than ``budget`` (the tokens the answer may still take after the pending
    one), no position at or past the context, and all rows in one forward."""
    return max(0, min(k, budget, context_tokens - position - 1, batch_tokens - 1))


def prefill(target: Target, prompt: Sequence[int]) -> np.ndarray:
    """The prompt in chunks of ``batch_tokens``; the last row's logits."""
    if not prompt:
        raise InvalidSettingError("the prompt must hold at least one token")
    step = target.batch_tokens
    for i in range(0, len(prompt), step):
        logits = target.forward(i, prompt[i:i + step], all_rows=False)
    return logits


def decode(target: Target, prompt: Sequence[int], max_tokens: int, *,
           drafter: Drafter | None = None, k: int = 0,
           params: SamplingParams | None = None, stop: Collection[int] = ()
           ) -> tuple[list[int], DecodeStats]:
    """Up to ``max_tokens`` new tokens after ``prompt`` (ending at the first ``stop``
    token, which is included), drafting ``k`` per pass with ``drafter``."""
    judge = Judge(params or SamplingParams())
    k = k if drafter is not None else 0
    stats = DecodeStats()
    pending = judge(NO_DRAFT, prefill(target, prompt)).token
    context, out = list(prompt), [pending]
    while len(out) < max_tokens and pending not in stop:
        pos = len(context)
        room = draft_room(k, max_tokens - len(out), pos, target.context_tokens,
                          target.batch_tokens)
        draft = drafter.propose([*context, pending], room) if room > 0 else NO_DRAFT
        rows = target.forward(pos, [pending, *draft.tokens], all_rows=True)
        verdict = judge(draft, rows)
        stats.passes += 1
        stats.drafted += len(draft.tokens)
        stats.accepted += verdict.accepted
        stats.rejections += verdict.accepted < len(draft.tokens)
        stats.drafting_passes += bool(draft.tokens)
        context += [pending, *draft.tokens[:verdict.accepted]]
        if verdict.accepted < len(draft.tokens):
            target.rollback(len(context))
        pending = verdict.token
        out += [*draft.tokens[:verdict.accepted], pending]
    out = _until_stop(out[:max_tokens], stop)
    stats.tokens = len(out)
    return out, stats


def _until_stop(tokens: list[int], stop: Collection[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in stop:
            return tokens[:i + 1]
    return tokens


class Lookahead(NamedTuple):
    """At one pending position of an answer: how many tokens the drafter proposed (up to
    the depth asked) and how many of them, from the first, the answer then had."""

    proposed: int
    matched: int


def lookaheads(drafter: Drafter, prompt: Sequence[int], answer: Sequence[int], start: int,
               depth: int, *, partial: bool = False) -> list[Lookahead]:
    """What ``drafter`` proposes (room ``depth``) at each pending position ``i`` of
    ``answer`` from ``start`` on, against the tokens the target chose after it: the
    positions with ``depth`` tokens known after them, and with ``partial`` the later ones
    too, each cut to the tokens known. A drafter's k proposals are the first k of its
    ``depth`` (prompt lookup's are), so one lookahead serves every draft length."""
    out = []
    tokens = [*prompt, *answer]  # the context at position i is its first len(prompt) + i + 1
    stop = len(answer) - 1 if partial else len(answer) - depth
    for i in range(start, stop):
        known = answer[i + 1:i + 1 + depth]
        proposal = drafter.propose(tokens[:len(prompt) + i + 1], len(known)).tokens
        matched = 0
        while matched < len(proposal) and proposal[matched] == known[matched]:
            matched += 1
        out.append(Lookahead(len(proposal), matched))
    return out
