"""A loaded stage: its engine, its place in the pipeline, and the data path through it.

Chunks arrive on ``submit`` (from the Forward stream of the previous stage or the
orchestrator) and are computed one at a time, in arrival order, by one compute thread.
A non-final stage sends its output straight to the next stage over a long-lived Forward
stream (``DownstreamLink``); the final stage samples and publishes ``StageOutput``s to the
orchestrator's Results stream. An error on a chunk travels on down the same path, so the
orchestrator learns about it in order, with the failing worker named. A failure outside
that path (the link to the next stage, publishing a result, a bug) becomes the stage's
``fault``: reported by Info, which the orchestrator polls while it waits, so it is named
within seconds instead of a step deadline later.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from orchcore.codecs import get_codec
from orchcore.engine import StageEngine, Step
from orchcore.errors import (
    InvalidInputError,
    MessageTooLargeError,
    OrchError,
    StageFaultError,
)
from orchcore.wire import convert, status
from orchcore.wire import worker_pb2 as pb
from orchcore.wire.channel import ForwardStream, Link, StreamClosedError
from worker.sampler import TokenSampler

log = logging.getLogger(__name__)

# sched_yield through ctypes, which lets the GIL go for the call: a spinning compute thread
# must not keep the thread that receives the next chunk from running Python.
_sched_yield = ctypes.CDLL(None, use_errno=True).sched_yield

_CLOSE_WAIT_S = 600.0  # longest a chunk in progress may take to finish when unloading
LEASE_S = 30.0  # a lease lapses this long after its orchestrator's last renewal
_ENDED_KEPT = 4096  # sessions remembered as ended, to drop ring chunks still on their way
_MERGE_WAIT_MAX_S = 0.5  # the longest stage 0 holds decode steps back to batch them
_STRAGGLER_WAIT_S = 0.002  # the steps of one batch come back within this of each other
_QUIET_TRIPS, _QUIET_MIN_S = 4, 0.05  # a batch out longer than this has gone quiet


class Leases:
    """Which orchestrators hold a stage, until when. Not thread-safe: the service locks."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[float, float]] = {}  # holder -> (since, expires)

    def hold(self, holder: str, now: float) -> None:
        since = self._held.get(holder, (time.time(), 0.0))[0]
        self._held[holder] = (since, now + LEASE_S)

    def renew(self, holder: str, now: float) -> bool:
        if self._live(now).get(holder) is None:
            return False
        self.hold(holder, now)
        return True

    def drop(self, holder: str) -> None:
        self._held.pop(holder, None)

    def _live(self, now: float) -> dict[str, tuple[float, float]]:
        self._held = {h: v for h, v in self._held.items() if v[1] > now}
        return self._held

    def others(self, holder: str, now: float) -> list[str]:
        return [h for h in self._live(now) if h != holder]

    def to_proto(self, now: float) -> list[pb.Holder]:
        return [pb.Holder(id=h, since=since, expires_in_s=expires - now)
                for h, (since, expires) in sorted(self._live(now).items())]

    def __bool__(self) -> bool:
        return bool(self._held)


class DownstreamLink:
    """The Forward stream from this stage to the next one, open for the pipeline's life.

    It connects at the first message, as a plain channel would: a next stage that is not
    there yet, or no longer, is this stage's fault at its first send, not a failed load."""

    def __init__(self, address: str, token: str | None, connect: Callable[[str], Link]
                 ) -> None:
        self.address = address
        self._token = token
        self._connect = connect
        self._link: Link | None = None
        self._stream: ForwardStream | None = None

    def send(self, msg: pb.StageInput) -> None:
        try:
            if self._stream is None:
                self._link = self._connect(self.address)
                self._stream = ForwardStream(self._link.channel, self._token)
            self._stream.send(msg)
        except OrchError as exc:
            raise StreamClosedError(f"next stage: {exc}") from None
        except StreamClosedError as exc:
            raise StreamClosedError(f"next stage {self.address} closed the stream: {exc}"
                                    ) from None

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._link is not None:
            self._link.close()


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


class _LocalEnd:
    def __init__(self, session: str) -> None:
        self.session = session


class Stage:
    def __init__(self, engine: StageEngine, request: pb.LoadShardRequest, *, worker_name: str,
                 token: str | None, max_message_bytes: int, connect: Callable[[str], Link],
                 resident_bytes: int = 0, spin_s: float = 0.0) -> None:
        self.engine = engine
        self.pipeline_id = request.pipeline_id
        self.sha256 = request.sha256
        self.index = request.stage_index
        self.count = request.stage_count
        self.codec = request.codec or "f32"
        self.worker_name = worker_name
        self.is_last = engine.role.is_last
        self.max_message_bytes = max_message_bytes
        self.resident_bytes = resident_bytes
        self.request = request  # what was asked: an identical request shares this stage
        self.leases = Leases()
        self.loaded_at = time.time()
        self.fault: pb.Error | None = None  # set once; Info reports it
        if self.is_last == bool(request.next_address):
            raise InvalidInputError(
                f"stage {self.index}: a next_address is needed exactly when the shard is not "
                f"the last one (layers end at {engine.role.end} of {engine.role.source_layers})")
        get_codec(self.codec)  # refuse an unknown codec before connecting
        self.next = (DownstreamLink(request.next_address, token, connect)
                     if request.next_address else None)
        if request.ring_address and not self.is_last:
            raise InvalidInputError(f"stage {self.index}: only the last stage has a "
                                    f"ring_address")
        # The token ring: the last stage sends each token it samples to stage 0 (itself
        # when it is also stage 0), so the orchestrator only listens.
        self.ring = (DownstreamLink(request.ring_address, token, connect)
                     if request.ring_address and not engine.role.is_first else None)
        self._ring_home = bool(request.ring_address) and engine.role.is_first
        # Sessions ended here, oldest first (a dict: ordered, and a set for lookups), so
        # that a ring chunk still on its way is dropped.
        self._ended: dict[str, None] = {}
        self._closing = False
        self._inbox: queue.SimpleQueue[tuple[pb.StageInput, float] | None] = queue.SimpleQueue()
        self._held: deque[tuple[pb.StageInput, float] | None] = deque()  # taken, not batched
        self.spin_s = spin_s  # how long the compute thread polls before blocking
        self._in_flight = InFlight()
        self._batch_s: dict[int, float] = {}  # decode batch size -> its compute time here
        # Stage 0 batches the decode steps of several sessions queued together; later stages
        # compute the batches it formed, so every stage runs the same batch shapes.
        self.batch_limit = (min(engine.config.max_sessions, engine.config.batch_tokens)
                            if engine.role.is_first else 1)
        self._subscribers: list[queue.SimpleQueue[pb.StageOutput | None]] = []
        self._samplers: dict[str, TokenSampler] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"stage-{self.index}",
                                        daemon=True)
        self._thread.start()

    def same_as(self, request: pb.LoadShardRequest, config_threads: int) -> bool:
        """Whether ``request`` asks for exactly this stage (then it is shared, not reloaded)."""
        mine, theirs = self.request, request
        return (mine.sha256, mine.layer_start, mine.layer_end, mine.next_address, mine.codec,
                mine.stage_index, mine.stage_count, mine.engine.context_tokens,
                mine.engine.max_sessions, mine.engine.batch_tokens, mine.ring_address) == (
            theirs.sha256, theirs.layer_start, theirs.layer_end, theirs.next_address,
            theirs.codec, theirs.stage_index, theirs.stage_count,
            theirs.engine.context_tokens, theirs.engine.max_sessions,
            theirs.engine.batch_tokens, theirs.ring_address
        ) and self.engine.config.threads == config_threads

    # --- inputs and outputs ------------------------------------------------------------

    def submit(self, msg: pb.StageInput) -> None:
        self._inbox.put((msg, time.perf_counter()))

    def end_session_here(self, session: str) -> None:
        """End a session on this stage only, in order with the chunks already queued."""
        self._inbox.put((_LocalEnd(session), time.perf_counter()))

    def subscribe(self) -> queue.SimpleQueue[pb.StageOutput | None]:
        q: queue.SimpleQueue[pb.StageOutput | None] = queue.SimpleQueue()
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.SimpleQueue) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)
        q.put(None)

    def _publish(self, out: pb.StageOutput) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        if not subscribers and not out.session_ended:
            log.warning("stage %d: result for session %s chunk %d has no subscriber",
                        self.index, out.session, out.chunk)
        for q in subscribers:
            q.put(out)

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

    def _take(self) -> tuple[pb.StageInput, float] | None:
        """The next chunk to compute, with the decode steps of other sessions queued
        behind it folded into ``batched`` (in arrival order) when it is one itself.

        The batch takes ``_batch_size`` steps. Short of that it waits 2 ms for the rest of
        a batch coming back; with a batch in flight per stage already, up to a batch's
        trip, for steps to join it rather than queue behind the others."""
        item = self._held.popleft() if self._held else self._wait()
        if item is None or not self._batchable(item[0]):
            return item
        lead = item[0]
        now = time.perf_counter()
        self._in_flight.returned(lead.session, now)
        batches, out = self._in_flight.busy(now)
        share = self._batch_size(out + 1 + self._inbox.qsize())
        sessions = [lead.session]
        give_up = None
        while len(sessions) < share:
            try:
                more = self._inbox.get_nowait()
            except queue.Empty:
                if give_up is None:
                    wait = (min(_MERGE_WAIT_MAX_S, self._in_flight.round_trip_s)
                            if batches >= self.count else _STRAGGLER_WAIT_S)
                    give_up = time.perf_counter() + wait
                try:
                    more = self._inbox.get(timeout=max(give_up - time.perf_counter(), 0))
                except queue.Empty:
                    break
            if more is None or not self._batchable(more[0]) or more[0].session in sessions:
                self._held.append(more)  # computed next, in order
                break
            self._in_flight.returned(more[0].session, time.perf_counter())
            lead.batched.append(more[0])
            sessions.append(more[0].session)
        self._in_flight.sent(sessions, time.perf_counter())
        return item

    def _batch_size(self, live: int) -> int:
        """How many of ``live`` decoding sessions to batch. Spread over k batches, k up
        to the number of stages (more would only queue), each batch goes round the
        stages in turn, so a token of every session takes one round of a batch of
        ``ceil(live / k)``: the k whose batch size this stage timed cheapest wins (a size
        not run yet counts as free, so it is tried once). llama.cpp's kernels make this
        uneven: with repacked Q4_0 weights a batch of 2 costs nearly two steps, one of
        4 not even two."""
        sizes = {min(-(-live // k), self.batch_limit) for k in range(1, self.count + 1)}
        return min(sorted(sizes), key=lambda b: self._batch_s.get(b, 0.0))

    def _time_batch(self, steps: int, spent_s: float) -> None:
        known = self._batch_s.get(steps)
        self._batch_s[steps] = spent_s if known is None else 0.7 * known + 0.3 * spent_s

    def _wait(self) -> tuple[pb.StageInput, float] | None:
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

    def _batchable(self, msg: pb.StageInput | _LocalEnd) -> bool:
        """A decode step of a session this stage holds, at the position it expects: it
        cannot fail on its own, so it can share a batch."""
        return (self.batch_limit > 1 and isinstance(msg, pb.StageInput)
                and len(msg.tokens) == 1 and not msg.HasField("error")
                and not msg.HasField("hidden") and not msg.batched
                and not msg.end_session and not msg.HasField("sampling")
                and 0 < msg.start_pos == self.engine.session_length(msg.session)
                and msg.start_pos < self.engine.config.context_tokens)

    def _handle(self, msg: pb.StageInput, arrived: float) -> None:
        started = time.perf_counter()
        tokens: list[int] = []
        if msg.session in self._ended and not msg.end_session:
            return  # a ring chunk of a session ended meanwhile (stopped by the orchestrator)
        if msg.HasField("error"):
            pass  # an earlier stage failed: pass the error on untouched
        elif msg.end_session:
            self.end_session(msg.session)
        else:
            try:
                tokens = self._compute(msg)
            except (OrchError, ValueError) as exc:
                self._fail(msg, exc)
            except Exception as exc:  # a bug: report it down the path instead of going silent
                log.exception("stage %d: unexpected failure on session %s chunk %d",
                              self.index, msg.session, msg.chunk)
                self._fail(msg, exc)
        size = msg.ByteSize()
        if size > self.max_message_bytes:
            self._fail(msg, MessageTooLargeError(
                f"hidden states of {size} bytes exceed the {self.max_message_bytes}-byte "
                f"message limit; use the q8_0 codec or raise --max-message-mb on the "
                f"workers"))
            size = msg.ByteSize()
        computed = time.perf_counter()
        if self.batch_limit > 1 and len(msg.tokens) == 1 and not msg.HasField("error"):
            self._time_batch(1 + len(msg.batched), computed - started)
        timing = msg.timings.add(stage_index=self.index, queue_ms=(started - arrived) * 1e3,
                                 compute_ms=(computed - started) * 1e3)
        if self.next is not None:
            timing.sent_bytes = size
            self._send_on(msg)
            timing.send_ms = (time.perf_counter() - computed) * 1e3
        else:
            self._publish_results(msg, tokens)

    def _publish_results(self, msg: pb.StageInput, tokens: list[int]) -> None:
        """The last stage's answer for each chunk of ``msg``'s batch that asks for one."""
        members = [msg, *msg.batched]
        batch = [m.chunk for m in members] if msg.batched else []
        error = msg.error if msg.HasField("error") else None
        broken_ring = None  # the ring goes first, so stage 0 starts on the next step at once
        for m, token in zip(members, tokens or [-1] * len(members), strict=True):
            if m.ring_left and token >= 0 and token not in m.ring_stops:
                try:
                    self._ring_on(m, token)
                except StageFaultError as exc:
                    broken_ring = exc
        for i, m in enumerate(members):
            if m.want_token or error is not None or m.end_session:
                self._publish(pb.StageOutput(session=m.session, chunk=m.chunk,
                                             token=tokens[i] if tokens else -1,
                                             timings=msg.timings, error=error,
                                             session_ended=m.end_session, batch=batch))
        if broken_ring is not None:
            raise broken_ring

    def _ring_on(self, m: pb.StageInput, token: int) -> None:
        """Send ``token`` to stage 0 as the session's next chunk."""
        step = pb.StageInput(pipeline_id=self.pipeline_id, session=m.session,
                             chunk=m.chunk + 1, start_pos=m.start_pos + len(m.tokens),
                             tokens=[token], want_token=True, ring_left=m.ring_left - 1,
                             ring_stops=m.ring_stops)
        if self._ring_home:
            self.submit(step)
            return
        if self.ring is None:
            raise StageFaultError(f"stage {self.index}: asked to run the token ring, but "
                                  f"it was loaded without a ring_address")
        try:
            self.ring.send(step)
        except StreamClosedError as exc:
            raise StageFaultError(f"token ring: {exc}") from None

    def _set_fault(self, exc: BaseException) -> None:
        if self.fault is None:
            self.fault = pb.Error(code=status.error_code(exc), message=str(exc) or repr(exc),
                                  worker=self.worker_name)

    def _fail(self, msg: pb.StageInput, exc: BaseException) -> None:
        msg.ClearField("hidden")
        msg.error.CopyFrom(pb.Error(code=status.error_code(exc), message=str(exc),
                                    worker=self.worker_name))

    def _send_on(self, msg: pb.StageInput) -> None:
        try:
            self.next.send(msg)
        except StreamClosedError as exc:
            raise StageFaultError(str(exc)) from None

    def _compute(self, msg: pb.StageInput) -> list[int]:
        """Run the chunk (and the steps batched with it); the last stage returns each one's
        sampled token (-1 where none is asked for)."""
        members = [msg, *msg.batched]
        steps = [Step(m.session, np.arange(m.start_pos, m.start_pos + len(m.tokens),
                                           dtype=np.int32)) for m in members]
        if self.engine.role.is_first:
            tokens = np.asarray([t for m in members for t in m.tokens], dtype=np.int32)
            out = self.engine.forward_batch(steps, tokens=tokens)
        else:
            if not msg.HasField("hidden"):
                raise InvalidInputError(f"stage {self.index} needs hidden states")
            hidden = convert.hidden_from_proto(msg.hidden)
            out = self.engine.forward_batch(steps, hidden=hidden)
        if not self.is_last:
            msg.hidden.CopyFrom(convert.hidden_to_proto(out, self.codec))
            return []
        sampled = []
        for m, logits in zip(members, out, strict=True):
            sampler = self._sampler(m)
            sampler.accept(list(m.tokens))
            sampled.append(sampler.sample(logits) if m.want_token else -1)
        return sampled

    def _sampler(self, msg: pb.StageInput) -> TokenSampler:
        sampler = self._samplers.get(msg.session)
        if sampler is None:
            if not msg.HasField("sampling"):
                raise InvalidInputError(f"session {msg.session!r}: the first chunk must carry "
                                        f"sampling parameters")
            params = convert.sampling_from_proto(msg.sampling)
            sampler = self._samplers[msg.session] = TokenSampler(params, self.engine.n_vocab)
        return sampler

    # --- lifetime ----------------------------------------------------------------------

    def end_session(self, session: str) -> bool:
        self._ended[session] = None
        if len(self._ended) > _ENDED_KEPT:
            del self._ended[next(iter(self._ended))]
        self._in_flight.returned(session, time.perf_counter())
        sampler = self._samplers.pop(session, None)
        if sampler is not None:
            sampler.close()
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
        with self._lock:
            for q in self._subscribers:
                q.put(None)
            self._subscribers.clear()
        if self.next is not None:
            self.next.close()
        if self.ring is not None:
            self.ring.close()
        for sampler in self._samplers.values():
            sampler.close()
        self._samplers.clear()
        self.engine.close()
