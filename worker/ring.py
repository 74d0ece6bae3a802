"""The token ring at the last stage: each token it samples for a chunk with ``ring_left``
goes straight to stage 0 as the session's next chunk, so the orchestrator only listens.
With ``draft_k`` the last stage drafts the next chunk's tokens too (prompt lookup over the
session's tokens, ``Verdicts.draft``): the ring then carries verification chunks. With tied
embeddings stage 0 holds no table: the last stage, which holds it as its lm head, sends the
rows of the tokens it sends (``StageEngine.embedding_rows``).

``RingFeed`` holds the stage side of the ring in one place: the rule for the next step, the
link to stage 0 (or stage 0 itself, when the last stage is also the first), and the
sessions ended here, so that ring chunks still on their way for them are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from orchcore.chunks import Chunk, EmbeddedRows
from orchcore.errors import InvalidInputError, StageFaultError
from orchcore.speculation.accept import Verdict
from orchcore.speculation.decode import draft_room
from orchcore.wire.channel import StreamClosedError
from worker.downstream import DownstreamLink

_ENDED_KEPT = 4096  # sessions remembered as ended, to drop ring chunks still on their way
BET_ODDS_PRIOR = 0.5  # a session's odds that a bet wins, before any verdict
BET_ODDS_WEIGHT = 0.25  # how much each verdict moves them (a moving average)
BET_ODDS_MIN = 0.5  # a bet goes only at these odds or better (a chain: their power)


def _pending_at(chunk: Chunk, verdict: Verdict) -> int:
    """The position of the new pending token: after the chunk's kept tokens."""
    return chunk.start_pos + len(chunk.tokens) - chunk.drafted + verdict.accepted


def next_step(chunk: Chunk, verdict: Verdict, drafts: tuple[int, ...] = ()) -> Chunk | None:
    """The chunk the ring sends after ``chunk`` came to ``verdict``: the new token and
    ``drafts``, at the position after the kept ones, numbered on, with as many tokens less
    left as the verdict added; None when the ring stops there (no tokens left, or one of
    its stops among the tokens added)."""
    added = (*chunk.drafts[:verdict.accepted], verdict.token)
    left = chunk.ring_left - len(added)
    if (not chunk.ring_left or verdict.token < 0 or left < 0
            or any(t in chunk.ring_stops for t in added)):
        return None
    return Chunk(pipeline_id=chunk.pipeline_id, session=chunk.session, chunk=chunk.chunk + 1,
                 start_pos=_pending_at(chunk, verdict), tokens=(verdict.token, *drafts),
                 want_token=True, ring_left=left, ring_stops=chunk.ring_stops,
                 drafted=len(drafts), draft_k=chunk.draft_k, draft_ahead=chunk.draft_ahead)


def ring_draft_room(chunk: Chunk, verdict: Verdict, context_tokens: int,
                    batch_tokens: int) -> int:
    """How many tokens the last stage drafts for the ring's step after ``chunk``."""
    if not chunk.draft_k or not chunk.ring_left or verdict.token < 0:
        return 0
    budget = chunk.ring_left - verdict.accepted - 1  # the next step's ring_left
    return draft_room(chunk.draft_k, budget, _pending_at(chunk, verdict), context_tokens,
                      batch_tokens)


class RingFeed:
    """Where a stage's ring steps go, and which sessions ended here."""

    def __init__(self, stage_index: int, *, is_first: bool, is_last: bool, ring_address: str,
                 link: Callable[[str], DownstreamLink], home: Callable[[Chunk], None],
                 embed: Callable[[Sequence[int]], EmbeddedRows | None] | None = None,
                 depth: int = 1) -> None:
        if ring_address and not is_last:
            raise InvalidInputError(f"stage {stage_index}: only the last stage has a "
                                    f"ring_address")
        self._index = stage_index
        self._home = home if ring_address and is_first else None
        self.link = link(ring_address) if ring_address and not is_first else None
        self._embed = embed  # the rows of the tokens sent, when stage 0 needs them
        # Sessions ended here, oldest first (a dict: ordered, and a set for lookups).
        self._ended: dict[str, None] = {}
        self.depth = depth  # bets in flight per session at most: the stages before this one
        self._ahead: dict[str, list[Chunk]] = {}  # per session: steps sent before verdicts
        self._stale: dict[str, set[int]] = {}  # per session: numbers of ahead steps to drop
        self._odds: dict[str, float] = {}  # per session: how often its bets win, lately
        self._unsent: dict[str, Chunk] = {}  # per session: the bet not placed, to score it

    def can_send_ahead(self, chunk: Chunk) -> bool:
        """Whether steps after ``chunk`` may go before the verdict on it: a lone ring chunk
        of a speculating session that asks for it, with a stage 0 elsewhere (a stage that is
        also stage 0 has nothing to overlap), and fewer than ``depth`` bets in flight."""
        return bool(chunk.draft_ahead and chunk.draft_k and chunk.ring_left and chunk.want_token
                    and not chunk.batched and chunk.error is None and self.link is not None
                    and len(self._ahead.get(chunk.session, ())) < self.depth)

    def bets(self, session: str) -> list[Chunk]:
        """The steps of ``session`` sent ahead and not yet resolved, in order."""
        return list(self._ahead.get(session, ()))

    def send_ahead(self, step: Chunk) -> bool:
        """Send ``step`` (the ring's step after a chunk whose verdict is not in yet, built
        for the verdict assumed) to stage 0 now, marked ``ahead``, if the session's bets
        have won often enough lately for one more in its chain to pay (a lost bet is not
        free: the real step waits while stage 0 finishes it). A bet not placed is kept to
        be scored against the verdict all the same. Returns whether it went."""
        step = replace(step, ahead=True)
        placed = self._ahead.setdefault(step.session, [])
        odds = self._odds.get(step.session, BET_ODDS_PRIOR)
        if odds ** (len(placed) + 1) < BET_ODDS_MIN:
            if not placed:
                self._unsent[step.session] = step
            return False
        placed.append(step)
        self._send(step)
        return True

    def _score(self, session: str, won: bool) -> None:
        odds = self._odds.get(session, BET_ODDS_PRIOR)
        self._odds[session] = odds + BET_ODDS_WEIGHT * (won - odds)

    def send(self, chunk: Chunk, verdict: Verdict, drafts: tuple[int, ...] = ()) -> None:
        """Send the ring's step after ``chunk`` to stage 0, if the ring goes on, unless the
        first step sent ahead of this verdict is that very step: it is on its way, and the
        bets after it stand. Otherwise every bet in flight is marked stale (each built on
        this one), and dropped here when it arrives."""
        step = next_step(chunk, verdict, drafts)
        real = None if step is None else replace(step, ahead=True)  # as a bet on it reads
        unsent = self._unsent.pop(chunk.session, None)
        if unsent is not None and unsent.chunk == chunk.chunk + 1:
            self._score(chunk.session, unsent == real)
        bets = self._ahead.pop(chunk.session, [])
        if bets:
            self._score(chunk.session, bets[0] == real)
        if bets and bets[0] == real:
            if len(bets) > 1:
                self._ahead[chunk.session] = bets[1:]
            return
        if bets:
            self._stale.setdefault(chunk.session, set()).update(b.chunk for b in bets)
        if step is not None:
            self._send(step)

    def stale(self, chunk: Chunk) -> bool:
        """Whether ``chunk`` was sent ahead of a verdict that did not lead to it (drop it:
        the step sent instead follows with its number). A real step clears its session's
        marks: the bets it replaced were all sent before it, so they have come by now, or
        were skipped on the way (``Stage._superseded``), and their numbers go to new ones."""
        if not chunk.ahead:
            self._stale.pop(chunk.session, None)
            return False
        numbers = self._stale.get(chunk.session)
        if not numbers or chunk.chunk not in numbers:
            return False
        numbers.discard(chunk.chunk)
        return True

    def _send(self, step: Chunk) -> None:
        if self._home is not None:
            self._home(step)
            return
        if self._embed is not None:
            step = replace(step, rows=self._embed(step.tokens))
        if self.link is None:
            raise StageFaultError(f"stage {self._index}: asked to run the token ring, but "
                                  f"it was loaded without a ring_address")
        try:
            self.link.send(step)
        except StreamClosedError as exc:
            raise StageFaultError(f"token ring: {exc}") from None

    def ended(self, session: str) -> None:
        self._ended[session] = None
        for kept in (self._ahead, self._stale, self._odds, self._unsent):
            kept.pop(session, None)
        if len(self._ended) > _ENDED_KEPT:
            del self._ended[next(iter(self._ended))]

    def dropped(self, chunk: Chunk) -> bool:
        """Whether ``chunk`` is a ring chunk of a session ended meanwhile (stopped by the
        orchestrator): nothing to do."""
        return chunk.session in self._ended and not chunk.end_session

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
