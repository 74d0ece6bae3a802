"""Stage 0's batching policy: which queued decode steps go into the next batch, how many,
and how long to wait for them. Pure: no queue, no engine, no clock of its own (every
method takes ``now``), so it is tested on its own.

Stage 0 batches the decode steps of several sessions queued together; later stages compute
the batches it formed, so every stage runs the same batch shapes.
"""

from __future__ import annotations

from orchcore.chunks import Chunk

MERGE_WAIT_MAX_S = 0.5  # the longest stage 0 holds decode steps back to batch them
STRAGGLER_WAIT_S = 0.002  # the steps of one batch come back within this of each other
_QUIET_TRIPS, _QUIET_MIN_S = 4, 0.05  # a batch out longer than this has gone quiet


class InFlight:
    """The batches stage 0 has started down the pipeline that have not come back yet.

    A batch is back when the next step of any of its sessions arrives (the last stage
    answers for a whole batch at once), or a session of it ends. ``round_trip_s`` is how
    long the last batch took to come back. A batch out for several round trips belongs to
    sessions gone quiet (an idle chat, an answer the orchestrator is finishing): it no
    longer counts as busy."""

    def __init__(self) -> None:
        self._batch_of: dict[str, int] = {}  # session -> the batch it went out in
        self._open: dict[int, float] = {}  # batch -> when it went out
        self._count = 0
        self.round_trip_s = 0.0

    def sent(self, sessions: list[str], now: float) -> None:
        self._count += 1
        self._open[self._count] = now
        for session in sessions:
            self._batch_of[session] = self._count

    def returned(self, session: str, now: float) -> None:
        went = self._open.pop(self._batch_of.pop(session, -1), None)
        if went is not None:
            self.round_trip_s = now - went

    def busy(self, now: float) -> tuple[int, int]:
        """(batches, sessions) out now and not gone quiet."""
        quiet = max(_QUIET_TRIPS * self.round_trip_s, _QUIET_MIN_S)
        recent = {b for b, went in self._open.items() if now - went < quiet}
        return len(recent), sum(b in recent for b in self._batch_of.values())


class BatchPolicy:
    """Which decode steps share a batch at one stage, sized by the costs it measured.

    ``limit`` is the most steps in one batch (1: this stage never forms batches, as every
    stage but the first); ``stages`` the pipeline's length; ``context_tokens`` each
    session's room."""

    def __init__(self, limit: int, stages: int, context_tokens: int) -> None:
        self.limit = limit
        self.stages = stages
        self.context_tokens = context_tokens
        self.in_flight = InFlight()
        self._batch_s: dict[int, float] = {}  # batch size -> its compute time here

    def batchable(self, chunk: Chunk, held: int) -> bool:
        """Whether ``chunk`` is a decode step of a session this stage holds at ``held``
        positions, at the position it expects: it cannot fail on its own, so it can share
        a batch."""
        return (self.limit > 1 and len(chunk.tokens) == 1 and chunk.error is None
                and chunk.hidden is None and not chunk.batched and not chunk.end_session
                and chunk.sampling is None and not chunk.every_row and not chunk.copy_to
                and not chunk.ahead
                and 0 < chunk.start_pos == held and chunk.start_pos < self.context_tokens)

    def open(self, lead: str, queued: int, now: float) -> tuple[int, float]:
        """A batch led by a step of session ``lead`` (back from its trip), with ``queued``
        items waiting behind it: how many steps it takes, and how long to wait for them
        once the queue is empty. That is 2 ms for the rest of a batch coming back; with a
        batch in flight per stage already, up to a batch's trip, for steps to join it
        rather than queue behind the others."""
        self.in_flight.returned(lead, now)
        batches, out = self.in_flight.busy(now)
        wait_s = (min(MERGE_WAIT_MAX_S, self.in_flight.round_trip_s)
                  if batches >= self.stages else STRAGGLER_WAIT_S)
        return self.size(out + 1 + queued), wait_s

    def joins(self, chunk: Chunk, held: int, sessions: list[str], now: float) -> bool:
        """Whether ``chunk`` joins the batch of ``sessions`` (else it is computed next);
        when it does, its session's last batch is back."""
        if not self.batchable(chunk, held) or chunk.session in sessions:
            return False
        self.in_flight.returned(chunk.session, now)
        return True

    def size(self, live: int) -> int:
        """How many of ``live`` decoding sessions to batch. Spread over k batches, k up
        to the number of stages (more would only queue), each batch goes round the
        stages in turn, so a token of every session takes one round of a batch of
        ``ceil(live / k)``: the k whose batch size this stage timed cheapest wins (a size
        not run yet counts as free, so it is tried once). llama.cpp's kernels make this
        uneven: with repacked Q4_0 weights a batch of 2 costs nearly two steps, one of
        4 not even two."""
        sizes = {min(-(-live // k), self.limit) for k in range(1, self.stages + 1)}
        return min(sorted(sizes), key=lambda b: self._batch_s.get(b, 0.0))

    def timed(self, chunk: Chunk, spent_s: float) -> None:
        """Record what computing ``chunk`` (a decode step and those batched with it) cost."""
        if self.limit > 1 and len(chunk.tokens) == 1 and chunk.error is None:
            steps = 1 + len(chunk.batched)
            known = self._batch_s.get(steps)
            self._batch_s[steps] = spent_s if known is None else 0.7 * known + 0.3 * spent_s

    def sent(self, sessions: list[str], now: float) -> None:
        self.in_flight.sent(sessions, now)

    def ended(self, session: str, now: float) -> None:
        self.in_flight.returned(session, now)
