"""One answer's state and its statistics: what entered the model, in the batch shapes it
was sent in (enough to rebuild it on another pipeline), and what the answer cost."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from orchcore.chunks import NO_TOKEN, RowScore, StageResult, StageTiming
from orchcore.sampling import SamplingParams, TokenLogprobs
from orchcore.speculation.decode import Lookahead
from orchestrator.pipeline.ring import TokenRing
from orchestrator.pipeline.speculation import Pass, SpeculationStats


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    first_token_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    compute_ms: dict[int, float] = field(default_factory=dict)  # per stage, decode steps
    queue_ms: dict[int, float] = field(default_factory=dict)  # per stage: behind other work
    wire_bytes: dict[int, int] = field(default_factory=dict)  # per hop, decode steps
    speculation: SpeculationStats = field(default_factory=SpeculationStats)

    def add_decode(self, timings: Sequence[StageTiming]) -> None:
        for t in timings:
            self.compute_ms[t.stage_index] = self.compute_ms.get(t.stage_index, 0) + t.compute_ms
            self.queue_ms[t.stage_index] = self.queue_ms.get(t.stage_index, 0) + t.queue_ms
            if t.sent_bytes:
                self.wire_bytes[t.stage_index] = (self.wire_bytes.get(t.stage_index, 0)
                                                  + t.sent_bytes)


@dataclass
class PromptShare:
    """n answers to one prompt, prefilled once: the session that sends the prompt marks it
    sent (or failed) here, and the sessions that copy its KV cache wait for that before
    sending anything of their own (their chunks must reach each stage after the copy)."""

    sent: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, sent: bool) -> None:
        if not self.done.is_set():
            self.sent = sent
            self.done.set()


@dataclass
class Session:
    """One answer's state: what entered the model, in its batch shapes, and the sampler's."""

    id: str
    sampling: SamplingParams  # seed concrete: a random seed is drawn once, here
    prompt_chunks: list[tuple[int, ...]] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    scores: list[TokenLogprobs | None] = field(default_factory=list)  # per generated token,
    #                                   when ``sampling.logprobs`` asked for them
    passes: list[Pass] = field(default_factory=list)  # decode steps after the prompt
    limit: int = 0  # tokens this answer may generate
    ring: TokenRing | None = None  # while the last stage feeds this session's steps itself
    draft_k: int = 0  # drafts per pass now (0: plain decoding)
    lookaheads: list[Lookahead] = field(default_factory=list)  # auto: what prompt lookup
    #                                  proposed at each position of the answer, and met
    draft_s: float = 0.0  # time this side spent drafting the session's passes
    # prompt logprobs: the last stage scores every prompt row; row i scores token i + 1
    score_prompt: bool = False
    prompt_scores: list[RowScore] = field(default_factory=list)
    # n answers to one prompt: the first `copied` prompt chunks reached the KV caches as a
    # copy of another session's (its `share` says when); `copy_to` get a copy of this one's
    copied: int = 0
    copy_to: tuple[str, ...] = ()
    share: PromptShare | None = None

    def record(self, out: StageResult) -> Pass | None:
        """Take a step's result: the tokens it added, and (after the prompt) its pass."""
        if out.token == NO_TOKEN:
            return None  # a prompt that asked for no token (prompt logprobs only)
        step = None
        if self.generated:
            step = Pass(self.length, (self.generated[-1], *out.drafts), len(out.drafts),
                        out.tokens)
            self.passes.append(step)
        self.generated += out.tokens
        self.scores += [None] * (len(out.tokens) - 1) + [out.logprobs]
        return step

    @property
    def prompt(self) -> list[int]:
        return [t for chunk in self.prompt_chunks for t in chunk]

    @property
    def length(self) -> int:
        """Positions this session holds in every stage's KV cache."""
        return sum(len(c) for c in self.prompt_chunks) + max(0, len(self.generated) - 1)
