"""The last stage's decisions, per session: the token of a plain step (llama.cpp's own
sampler chain, ``TokenSampler``), the verdict on a verification chunk's drafts
(``orchcore.speculation``: greedy, or speculative sampling with the session's seeded
generator), and the session's tokens so far, which the token ring drafts from.

A verification chunk carries the pending token and k drafts; its logits come for every
row. The verdict keeps the longest acceptable prefix of the drafts plus one token of the
target's own. The positions it rejects stay in the KV caches until the session's next chunk,
which starts below the stage's length: every stage then drops them first (``Stage``).
"""

from __future__ import annotations

import numpy as np

from orchcore.chunks import NO_TOKEN, Chunk, RowScore
from orchcore.errors import InvalidInputError
from orchcore.sampling import TokenLogprobs
from orchcore.speculation.accept import Verdict
from orchcore.speculation.decode import Judge
from orchcore.speculation.drafters import Draft, PromptLookup
from worker.publish import NOTHING
from worker.sampler import TokenSampler, token_logprobs


class Verdicts:
    """Per session at the last stage: its sampler chain, its judge (made at its first
    verification chunk), and every token that entered the model, in position order."""

    def __init__(self, n_vocab: int, vocab: object | None = None) -> None:
        self.n_vocab, self.vocab = n_vocab, vocab  # vocab: for grammars (llama_vocab_p)
        self._samplers: dict[str, TokenSampler] = {}
        self._judges: dict[str, Judge] = {}
        self._history: dict[str, list[int]] = {}
        self._drafter = PromptLookup()

    def decide(self, chunk: Chunk, logits: np.ndarray) -> Verdict:
        """Record ``chunk``'s tokens and answer it: nothing, a sampled token, or the verdict
        on its drafts (``logits``: one row per token of a verification chunk, else the
        chunk's last row)."""
        sampler = self._sampler(chunk)
        judge = self._judge(chunk, sampler) if chunk.verifies else None
        history = self._history.setdefault(chunk.session, [])
        del history[chunk.start_pos:]  # positions rolled back on every stage
        history += chunk.tokens
        sampler.accept(chunk.tokens)
        if not chunk.want_token:
            return NOTHING
        if judge is None:
            return Verdict(0, sampler.sample(logits[-1]))
        return judge(Draft(chunk.drafts), logits)

    def score(self, chunk: Chunk, row: np.ndarray, verdict: Verdict) -> TokenLogprobs | None:
        """The sampled token's logprobs from its logits ``row``, when the session asked for
        them (a plain step's: sessions that ask are not speculated)."""
        if verdict.token == NO_TOKEN or chunk.verifies:
            return None
        return self._sampler(chunk).logprobs(row, verdict.token)

    def score_rows(self, chunk: Chunk, logits: np.ndarray) -> tuple[RowScore, ...]:
        """Prompt logprobs: each row's log-softmax (float64, as ``score``) scores the token
        after it (the chunk's next, or ``next_token`` after the last row; None where that
        is unknown) with the session's ``top_logprobs`` most likely tokens."""
        top = self._sampler(chunk).params.top_logprobs
        after = (*chunk.tokens[1:], NO_TOKEN if chunk.next_token is None else chunk.next_token)
        out = []
        for row, token in zip(logits, after, strict=True):
            scored = token_logprobs(row, max(token, 0), top)
            out.append(RowScore(None if token == NO_TOKEN else scored.logprob, scored.top))
        return tuple(out)

    def copy(self, source: str, target: str) -> None:
        """``target`` starts as a copy of ``source``: the same tokens so far. Its sampler
        is made from its own first chunk's parameters, fed those tokens."""
        if target in self._history or target in self._samplers:
            raise InvalidInputError(f"session {target!r} exists already; a copy starts a "
                                    f"new one")
        self._history[target] = list(self._history.get(source, ()))

    def kept(self, chunk: Chunk, verdict: Verdict) -> list[int]:
        """The session's tokens once ``verdict`` is in: what entered the model and was kept,
        then the new pending token (before ``decide`` on ``chunk`` too)."""
        length = len(chunk.tokens) - chunk.drafted + verdict.accepted
        return [*self._history.get(chunk.session, [])[:chunk.start_pos],
                *chunk.tokens[:length], verdict.token]

    def draft(self, chunk: Chunk, verdict: Verdict, room: int) -> tuple[int, ...]:
        """Up to ``room`` tokens to verify after the new pending token (prompt lookup)."""
        if room <= 0:
            return ()
        return self._drafter.propose(self.kept(chunk, verdict), room).tokens

    def guess(self, chain: list[Chunk]) -> Verdict | None:
        """The verdict on the last of ``chain`` (a chunk, then the steps sent ahead after
        it) that prompt lookup expects before any is computed: every draft of each kept,
        then the token the lookup proposes next; None when it has none."""
        proposed = self._drafter.propose(self._assumed(chain), 1).tokens
        return Verdict(chain[-1].drafted, proposed[0]) if proposed else None

    def draft_after(self, chain: list[Chunk], verdict: Verdict, room: int) -> tuple[int, ...]:
        """``draft`` for the last of ``chain`` had every chunk of it been kept whole."""
        if room <= 0:
            return ()
        return self._drafter.propose([*self._assumed(chain), verdict.token], room).tokens

    def _assumed(self, chain: list[Chunk]) -> list[int]:
        """The session's tokens had every chunk of ``chain`` (consecutive) been kept."""
        first = chain[0]
        return [*self._history.get(first.session, [])[:first.start_pos],
                *(t for c in chain for t in c.tokens)]

    def _sampler(self, chunk: Chunk) -> TokenSampler:
        sampler = self._samplers.get(chunk.session)
        if sampler is None:
            if chunk.sampling is None:
                raise InvalidInputError(f"session {chunk.session!r}: the first chunk must "
                                        f"carry sampling parameters")
            sampler = self._samplers[chunk.session] = TokenSampler(
                chunk.sampling, self.n_vocab, self.vocab)
            # a copied session's tokens so far (its penalties' history)
            sampler.accept(self._history.get(chunk.session, [])[:chunk.start_pos])
        return sampler

    def _judge(self, chunk: Chunk, sampler: TokenSampler) -> Judge:
        judge = self._judges.get(chunk.session)
        if judge is None:  # refuses penalised sessions: their history cannot roll back
            judge = self._judges[chunk.session] = Judge(sampler.params)
        return judge

    def end(self, session: str) -> None:
        self._history.pop(session, None)
        self._judges.pop(session, None)
        sampler = self._samplers.pop(session, None)
        if sampler is not None:
            sampler.close()

    def close(self) -> None:
        for session in list(self._samplers):
            self.end(session)
        self._history.clear()
        self._judges.clear()
