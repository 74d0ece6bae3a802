"""The last stage's results: which chunks of a computed batch get one, and the Results
streams subscribed to them."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from typing import NamedTuple

from orchcore.chunks import NO_TOKEN, Chunk, Rows, RowScore, StageResult
from orchcore.sampling import TokenLogprobs
from orchcore.speculation.accept import Verdict

log = logging.getLogger(__name__)

NOTHING = Verdict(0, NO_TOKEN)  # the answer to a chunk that asked for no token


class Outputs(NamedTuple):
    """What a lone chunk asked of the last stage beyond a token: its rows' scores (prompt
    logprobs) or its final-norm rows (embeddings)."""

    row_scores: tuple[RowScore, ...] = ()
    embedding: Rows | None = None


NO_OUTPUTS = Outputs()


def results_for(chunk: Chunk, verdicts: list[Verdict],
                scores: Sequence[TokenLogprobs | None] = (),
                outputs: Outputs = NO_OUTPUTS) -> list[StageResult]:
    """The answers for ``chunk``'s batch: each member that asks for a token (or scored
    rows, or embeddings), failed, or ends its session gets one (``verdicts``: one per
    member, each its token and the drafts it kept; empty when nothing was sampled;
    ``scores``: their logprobs likewise; ``outputs``: a lone chunk's rows)."""
    members = chunk.members
    batch = tuple(m.chunk for m in members) if chunk.batched else ()
    verdicts = verdicts or [NOTHING] * len(members)
    scores = scores or [None] * len(members)
    return [StageResult(session=m.session, chunk=m.chunk, token=v.token, timings=chunk.timings,
                        error=chunk.error, session_ended=m.end_session, batch=batch,
                        drafts=m.drafts, accepted=v.accepted, ahead=m.ahead, logprobs=score,
                        row_scores=outputs.row_scores, embedding=outputs.embedding)
            for m, v, score in zip(members, verdicts, scores, strict=True)
            if m.answered or chunk.error is not None]


class Subscribers:
    """The Results streams of a last stage: each result goes to every one of them."""

    def __init__(self, stage_index: int) -> None:
        self._index = stage_index
        self._queues: list[queue.SimpleQueue[StageResult | None]] = []
        self._lock = threading.Lock()

    def subscribe(self) -> queue.SimpleQueue[StageResult | None]:
        q: queue.SimpleQueue[StageResult | None] = queue.SimpleQueue()
        with self._lock:
            self._queues.append(q)
        return q

    def unsubscribe(self, q: queue.SimpleQueue) -> None:
        with self._lock:
            if q in self._queues:
                self._queues.remove(q)
        q.put(None)

    def publish(self, out: StageResult) -> None:
        with self._lock:
            subscribers = list(self._queues)
        if not subscribers and not out.session_ended:
            log.warning("stage %d: result for session %s chunk %d has no subscriber",
                        self._index, out.session, out.chunk)
        for q in subscribers:
            q.put(out)

    def close(self) -> None:
        """End every stream."""
        with self._lock:
            for q in self._queues:
                q.put(None)
            self._queues.clear()
