"""A loaded stage: its engine, its place in the pipeline, and the data path through it.

Chunks arrive on ``submit`` (from the Forward stream of the previous stage or the
orchestrator) and are computed one at a time, in arrival order, by one compute thread.
A non-final stage sends its output straight to the next stage over a long-lived Forward
stream (``DownstreamLink``); the final stage samples and publishes ``StageResult``s to the
orchestrator's Results stream (``Subscribers``). An error on a chunk travels on down the
same path, so the orchestrator learns about it in order, with the failing worker named. A
failure outside that path (the link to the next stage, publishing a result, a bug) becomes
the stage's ``fault``: reported by Info, which the orchestrator polls while it waits, so it
is named within seconds instead of a step deadline later.

Which queued decode steps share a batch is ``BatchPolicy``'s decision (``worker/batching``);
the token ring's steps go through ``RingFeed`` (``worker/ring``); the last stage's tokens and
verdicts on drafts come from ``Verdicts`` (``worker/verdicts``). A chunk that starts below a
session's length (the drafts a verdict rejected) first drops the positions from there on.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from orchcore.chunks import Chunk, ChunkError, Rows, StageTiming
from orchcore.codecs import get_codec
from orchcore.control import LoadRequest
from orchcore.engine import StageEngine, Step
from orchcore.errors import InvalidInputError, MessageTooLargeError, OrchError, StageFaultError
from orchcore.sampling import TokenLogprobs
from orchcore.speculation.accept import Verdict
from orchcore.wire import convert, status
from orchcore.wire.channel import Link, StreamClosedError
from worker.batching import BatchPolicy, InFlight
from worker.downstream import DownstreamLink
from worker.leases import Leases
from worker.publish import NO_OUTPUTS, NOTHING, Outputs, Subscribers, results_for
from worker.ring import RingFeed, next_step, ring_draft_room
from worker.verdicts import Verdicts

__all__ = ["DownstreamLink", "InFlight", "Stage"]

log = logging.getLogger(__name__)

# sched_yield through ctypes, which lets the GIL go for the call: a spinning compute thread
# must not keep the thread that receives the next chunk from running Python.
_sched_yield = ctypes.CDLL(None, use_errno=True).sched_yield

_CLOSE_WAIT_S = 600.0  # longest a chunk in progress may take to finish when unloading

_Item = tuple[Chunk, float] | tuple["_LocalEnd", float]


class _LocalEnd:
    def __init__(self, session: str) -> None:
        self.session = session


class Stage:
    def __init__(self, engine: StageEngine, request: LoadRequest, *, worker_name: str,
                 token: str | None, max_message_bytes: int, connect: Callable[[str], Link],
                 resident_bytes: int = 0, spin_s: float = 0.0) -> None:
        self.engine = engine
        self.request = request  # what was asked: an identical request shares this stage
        self.index = request.stage_index
        self.worker_name = worker_name
        self.max_message_bytes = max_message_bytes
        self.resident_bytes = resident_bytes
        self.spin_s = spin_s  # how long the compute thread polls before blocking
        self.leases = Leases()
        self.loaded_at = time.time()
        self.fault: ChunkError | None = None  # set once; Info reports it
        role = engine.role
        if role.is_last == bool(request.next_address):
            raise InvalidInputError(
                f"stage {self.index}: a next_address is needed exactly when the shard is not "
                f"the last one (layers end at {role.end} of {role.source_layers})")
        get_codec(request.codec)  # refuse an unknown codec before connecting

        def link(address: str) -> DownstreamLink:
            return DownstreamLink(address, token, connect)

        self.next = link(request.next_address) if request.next_address else None
        self.ring = RingFeed(self.index, is_first=role.is_first, is_last=role.is_last,
                             ring_address=request.ring_address, link=link, home=self.submit,
                             embed=engine.embedding_rows,
                             depth=max(1, request.stage_count - 1))
        self.batching = BatchPolicy(
            min(engine.config.max_sessions, engine.config.batch_tokens) if role.is_first
            else 1, request.stage_count, engine.config.context_tokens)
        self.subscribers = Subscribers(self.index)
        self.verdicts = Verdicts(engine.n_vocab, engine.vocab) if role.is_last else None
        self._inbox: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._held: deque[_Item | None] = deque()  # taken, not computed yet: next, in order
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"stage-{self.index}",
                                        daemon=True)
        self._thread.start()

    @property
    def pipeline_id(self) -> str:
        return self.request.pipeline_id

    @property
    def sha256(self) -> str:
        return self.request.sha256

    @property
    def is_last(self) -> bool:
        return self.engine.role.is_last

    # --- inputs and outputs ------------------------------------------------------------

    def submit(self, chunk: Chunk) -> None:
        self._inbox.put((chunk, time.perf_counter()))

    def end_session_here(self, session: str) -> None:
        """End a session on this stage only, in order with the chunks already queued."""
        self._inbox.put((_LocalEnd(session), time.perf_counter()))

    # --- the compute loop --------------------------------------------------------------

    def _run(self) -> None:
        while (item := self._take()) is not None:
            msg, arrived = item
            if self._closing:
                continue  # unloading: drop what is still queued
            if isinstance(msg, _LocalEnd):
                self.end_session(msg.session)
                continue
            try:
                self._handle(msg, arrived)
            except Exception as exc:  # after compute: publishing, sending on, or a bug
                log.exception("stage %d: failure on session %s chunk %d", self.index,
                              msg.session, msg.chunk)
                self._set_fault(exc)

    def _take(self) -> _Item | None:
        """The next chunk to compute, with the decode steps of other sessions queued
        behind it folded into ``batched`` (in arrival order) when it is one itself, as
        many and as long waited for as ``BatchPolicy`` says."""
        item = self._held.popleft() if self._held else self._wait()
        if item is None or not self._batchable(item[0]):
            return item
        lead, arrived = item
        share, wait_s = self.batching.open(lead.session, self._inbox.qsize(),
                                           time.perf_counter())
        sessions, batched = [lead.session], []
        give_up = None
        while len(sessions) < share:
            try:
                more = self._held.popleft() if self._held else self._inbox.get_nowait()
            except queue.Empty:
                give_up = give_up or time.perf_counter() + wait_s
                try:
                    more = self._inbox.get(timeout=max(give_up - time.perf_counter(), 0))
                except queue.Empty:
                    break
            if more is None or not isinstance(more[0], Chunk) or not self.batching.joins(
                    more[0], self._held_length(more[0]), sessions, time.perf_counter()):
                self._held.appendleft(more)  # computed next, in order
                break
            batched.append(more[0])
            sessions.append(more[0].session)
        self.batching.sent(sessions, time.perf_counter())
        return (replace(lead, batched=tuple(batched)) if batched else lead), arrived

    def _held_length(self, chunk: Chunk) -> int:
        return self.engine.session_length(chunk.session)

    def _batchable(self, msg: Chunk | _LocalEnd) -> bool:
        return isinstance(msg, Chunk) and self.batching.batchable(msg, self._held_length(msg))

    def _wait(self) -> _Item | None:
        """The next inbox item: polled for ``spin_s`` (yielding the core, and the GIL, to
        any other thread between polls), then waited for."""
        if self.spin_s:
            give_up = time.perf_counter() + self.spin_s
            while time.perf_counter() < give_up:
                try:
                    return self._inbox.get_nowait()
                except queue.Empty:
                    _sched_yield()
        return self._inbox.get()

    def _superseded(self, chunk: Chunk) -> bool:
        """Whether ``chunk`` is a step sent ahead whose bet was lost: a real step of its
        session numbered at or below it is already queued behind it (the last stage sends
        one only when a bet up to there lost, and every later bet built on it). Skip it
        here, whichever stage this is, instead of computing it before the real one."""
        if not chunk.ahead:
            return False
        while True:  # what has come meanwhile, kept in order for the next takes
            try:
                self._held.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return any(item is not None and isinstance(item[0], Chunk) and not item[0].ahead
                   and item[0].session == chunk.session and item[0].chunk <= chunk.chunk
                   for item in self._held)

    def _handle(self, msg: Chunk, arrived: float) -> None:
        started = time.perf_counter()
        verdicts: list[Verdict] = []
        scores: list[TokenLogprobs | None] = []
        outputs = NO_OUTPUTS
        if self.ring.dropped(msg) or self.ring.stale(msg) or self._superseded(msg):
            return  # a ring chunk of a session ended meanwhile, or one sent ahead in vain
        if msg.error is not None:
            pass  # an earlier stage failed: pass the error on untouched
        elif msg.end_session:
            self.end_session(msg.session)
        else:
            try:
                if self.ring.can_send_ahead(msg):
                    self._send_ahead(msg)
                msg, verdicts, scores, outputs = self._compute(msg)
            except (OrchError, ValueError) as exc:
                msg = self._fail(msg, exc)
            except Exception as exc:  # a bug: report it down the path instead of going silent
                log.exception("stage %d: unexpected failure on session %s chunk %d",
                              self.index, msg.session, msg.chunk)
                msg = self._fail(msg, exc)
        computed = time.perf_counter()
        self.batching.timed(msg, computed - started)
        timing = StageTiming(self.index, queue_ms=(started - arrived) * 1e3,
                             compute_ms=(computed - started) * 1e3)
        if self.next is None:
            self._publish(msg.timed(timing), verdicts, scores, outputs)
            return
        msg = msg.without_rows()  # stage 0's input: no later stage reads it
        size = convert.chunk_size(msg)
        if size > self.max_message_bytes:
            msg = self._fail(msg, MessageTooLargeError(
                f"hidden states of {size} bytes exceed the {self.max_message_bytes}-byte "
                f"message limit; use the q8_0 codec or raise --max-message-mb on the "
                f"workers"))
            size = convert.chunk_size(msg)
        sent = msg.timed(timing._replace(sent_bytes=size,
                                         send_ms=(time.perf_counter() - computed) * 1e3))
        try:
            self.next.send(sent)
        except StreamClosedError as exc:
            raise StageFaultError(str(exc)) from None

    def _publish(self, msg: Chunk, verdicts: list[Verdict],
                 scores: list[TokenLogprobs | None], outputs: Outputs = NO_OUTPUTS) -> None:
        """The last stage's answer for each chunk of ``msg``'s batch that asks for one. The
        ring goes first (with the drafts it carries next), so stage 0 starts on the next
        step at once."""
        broken_ring = None
        config = self.engine.config
        for m, verdict in zip(msg.members, verdicts or [NOTHING] * len(msg.members),
                              strict=True):
            room = ring_draft_room(m, verdict, config.context_tokens, config.batch_tokens)
            try:
                self.ring.send(m, verdict, self.verdicts.draft(m, verdict, room))
            except StageFaultError as exc:
                broken_ring = exc
        for out in results_for(msg, verdicts, scores, outputs):
            self.subscribers.publish(out)
        if broken_ring is not None:
            raise broken_ring

    def _send_ahead(self, msg: Chunk) -> None:
        """Asynchronous speculation: before computing ``msg``, send the ring's steps that
        would follow the verdicts prompt lookup expects (every draft kept, then its guess),
        each built on the one before, up to one per stage before this one, so those stages
        compute them while this one verifies. ``_publish`` then sends the real step only
        when a verdict differs (``RingFeed.send``)."""
        chain = [msg, *self.ring.bets(msg.session)]
        config = self.engine.config
        while self.ring.can_send_ahead(msg):
            last = chain[-1]
            assumed = self.verdicts.guess(chain)
            if assumed is None:
                return
            room = ring_draft_room(last, assumed, config.context_tokens, config.batch_tokens)
            step = next_step(last, assumed, self.verdicts.draft_after(chain, assumed, room))
            if step is None or not self.ring.send_ahead(step):
                return
            chain.append(step)

    def _set_fault(self, exc: BaseException) -> None:
        if self.fault is None:
            self.fault = ChunkError(status.error_code(exc), str(exc) or repr(exc),
                                    self.worker_name)

    def _fail(self, msg: Chunk, exc: BaseException) -> Chunk:
        return msg.failed(ChunkError(status.error_code(exc), str(exc), self.worker_name))

    def _compute(self, msg: Chunk
                 ) -> tuple[Chunk, list[Verdict], list[TokenLogprobs | None], Outputs]:
        """Run the chunk (and the steps batched with it): a non-final stage returns it with
        its output rows; the last stage returns each one's verdict (its token, and the
        drafts it kept), the token's logprobs (None where the session asked for none), and
        a lone chunk's scored rows or embedding rows when it asked for them. Sessions in
        ``copy_to`` get a copy of the session's KV cache (and history) afterwards."""
        members = msg.members
        for m in members:  # the positions a verdict rejected go before anything is computed
            if m.start_pos < self.engine.session_length(m.session):
                self.engine.rollback(m.session, m.start_pos)
        limit = self.engine.config.output_rows
        if (msg.score_rows or msg.embed) and len(msg.tokens) > limit:
            raise InvalidInputError(f"a chunk scoring or embedding its rows carries at most "
                                    f"{limit} tokens (output_rows), got {len(msg.tokens)}")
        steps = [Step(m.session, m.positions) for m in members]
        # a chunk with every row's output is never batched (BatchPolicy.batchable)
        every_row, embed = msg.verifies or msg.score_rows, msg.embed
        if self.engine.role.is_first:
            tokens = np.asarray([t for m in members for t in m.tokens], dtype=np.int32)
            out = self.engine.forward_batch(steps, tokens=tokens, rows=msg.embedded(),
                                            all_logits=every_row, embed=embed)
        else:
            if msg.hidden is None:
                raise InvalidInputError(f"stage {self.index} needs hidden states")
            out = self.engine.forward_batch(steps, hidden=msg.hidden.decode(),
                                            all_logits=every_row, embed=embed)
        self._copy(msg)
        if not self.is_last:
            return replace(msg, hidden=Rows.encode(out, self.request.codec)), [], [], \
                NO_OUTPUTS
        if embed:  # no sampler: an embedding session asks for no token
            return msg, [], [], Outputs(embedding=Rows.encode(out, "f32"))
        if msg.verifies:
            return msg, [self.verdicts.decide(msg, out)], [None], NO_OUTPUTS
        if msg.score_rows:
            verdict = self.verdicts.decide(msg, out[-1:])
            return msg, [verdict], [self.verdicts.score(msg, out[-1], verdict)], \
                Outputs(row_scores=self.verdicts.score_rows(msg, out))
        verdicts = [self.verdicts.decide(m, out[i:i + 1]) for i, m in enumerate(members)]
        return msg, verdicts, [self.verdicts.score(m, out[i], v)
                               for i, (m, v) in enumerate(zip(members, verdicts, strict=True))
                               ], NO_OUTPUTS

    def _copy(self, msg: Chunk) -> None:
        """n answers to one prompt: each session of ``copy_to`` starts as a copy of this one."""
        for target in msg.copy_to:
            self.engine.copy_session(msg.session, target)
            if self.verdicts is not None:
                self.verdicts.copy(msg.session, target)

    # --- lifetime ----------------------------------------------------------------------

    def end_session(self, session: str) -> bool:
        self.ring.ended(session)
        self.batching.ended(session, time.perf_counter())
        if self.verdicts is not None:
            self.verdicts.end(session)
        return self.engine.end_session(session)

    def close(self) -> None:
        self._closing = True
        self._inbox.put(None)
        # The engine may only be freed once the compute thread is out of llama_decode.
        self._thread.join(timeout=_CLOSE_WAIT_S)
        if self._thread.is_alive():
            log.error("stage %d: compute thread still busy after %.0f s; leaving its engine "
                      "allocated", self.index, _CLOSE_WAIT_S)
            return
        self.subscribers.close()
        if self.next is not None:
            self.next.close()
        self.ring.close()
        if self.verdicts is not None:
            self.verdicts.close()
        self.engine.close()
