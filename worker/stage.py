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

import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from orchcore.codecs import get_codec
from orchcore.engine import StageEngine
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

_CLOSE_WAIT_S = 600.0  # longest a chunk in progress may take to finish when unloading
LEASE_S = 30.0  # a lease lapses this long after its orchestrator's last renewal


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


class _LocalEnd:
    def __init__(self, session: str) -> None:
        self.session = session


class Stage:
    def __init__(self, engine: StageEngine, request: pb.LoadShardRequest, *, worker_name: str,
                 token: str | None, max_message_bytes: int, connect: Callable[[str], Link],
                 resident_bytes: int = 0) -> None:
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
        self._closing = False
        self._inbox: queue.SimpleQueue[tuple[pb.StageInput, float] | None] = queue.SimpleQueue()
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
                mine.engine.max_sessions, mine.engine.batch_tokens) == (
            theirs.sha256, theirs.layer_start, theirs.layer_end, theirs.next_address,
            theirs.codec, theirs.stage_index, theirs.stage_count,
            theirs.engine.context_tokens, theirs.engine.max_sessions,
            theirs.engine.batch_tokens) and self.engine.config.threads == config_threads

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
        while (item := self._inbox.get()) is not None:
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

    def _handle(self, msg: pb.StageInput, arrived: float) -> None:
        started = time.perf_counter()
        token = -1
        if msg.HasField("error"):
            pass  # an earlier stage failed: pass the error on untouched
        elif msg.end_session:
            self.end_session(msg.session)
        else:
            try:
                token = self._compute(msg)
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
        timing = msg.timings.add(stage_index=self.index, queue_ms=(started - arrived) * 1e3,
                                 compute_ms=(computed - started) * 1e3)
        if self.next is not None:
            timing.sent_bytes = size
            self._send_on(msg)
            timing.send_ms = (time.perf_counter() - computed) * 1e3
        elif msg.want_token or msg.HasField("error") or msg.end_session:
            self._publish(pb.StageOutput(session=msg.session, chunk=msg.chunk, token=token,
                                         timings=msg.timings, error=msg.error if msg.HasField(
                                             "error") else None,
                                         session_ended=msg.end_session))

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

    def _compute(self, msg: pb.StageInput) -> int:
        tokens = np.asarray(msg.tokens, dtype=np.int32)
        positions = np.arange(msg.start_pos, msg.start_pos + len(tokens), dtype=np.int32)
        if self.engine.role.is_first:
            out = self.engine.forward(msg.session, positions, tokens=tokens)
        else:
            if not msg.HasField("hidden"):
                raise InvalidInputError(f"stage {self.index} needs hidden states")
            hidden = convert.hidden_from_proto(msg.hidden)
            out = self.engine.forward(msg.session, positions, hidden=hidden)
        if not self.is_last:
            msg.hidden.CopyFrom(convert.hidden_to_proto(out, self.codec))
            return -1
        sampler = self._sampler(msg)
        sampler.accept(tokens.tolist())
        return sampler.sample(out[-1]) if msg.want_token else -1

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
        for sampler in self._samplers.values():
            sampler.close()
        self._samplers.clear()
        self.engine.close()
