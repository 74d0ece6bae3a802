"""The data path of one deployed pipeline, seen from the orchestrator.

Token ids go into stage 0 over one long-lived Forward stream; sampled tokens come back
from the last stage over one Results stream and are routed to the session that waits
for them. Hidden states flow stage to stage and never pass through here. With tied
embeddings split in two or more, each chunk carries its tokens' embedding rows
(``orchestrator.pipeline.inputrows``): stage 0 holds no table.

While a step waits, every worker is probed (``probe``) each ``probe_interval_s``: a dead
or hung worker, a stage that reports a fault, or a worker that lost the pipeline is named
within seconds, with its stage and layers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace

from orchcore.chunks import Chunk, StageResult
from orchcore.errors import NotLoadedError, OrchError, WorkerUnreachableError
from orchcore.sampling import SamplingParams
from orchcore.wire.channel import ForwardStream
from orchcore.wire.status import from_code
from orchestrator.cluster.client import ResultStream, WorkerClient
from orchestrator.pipeline.inputrows import RowSource
from orchestrator.pipeline.ring import TokenRing
from orchestrator.planning.plan import Plan
from orchestrator.settings import OrchSettings

log = logging.getLogger(__name__)


class DataPath:
    def __init__(self, plan: Plan, pipeline_id: str, clients: Sequence[WorkerClient],
                 token: str | None, settings: OrchSettings,
                 alive: Callable[[], None] | None = None, rows: RowSource | None = None
                 ) -> None:
        self.plan = plan
        self.rows = rows  # where the embedding rows of what we send come from, if needed
        if rows is not None:  # closed with the path's last user: a step may still send on
            weakref.finalize(self, rows.close)  # an abandoned path, and must fail typed
        self.pipeline_id = pipeline_id
        self.clients = list(clients)
        self.settings = settings
        self._token = token
        self._alive = alive
        self._results: dict[str, queue.SimpleQueue[StageResult | Exception]] = {}
        self._broken: OrchError | None = None
        self._subscribed = threading.Event()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # numbering and queueing a chunk, together
        self._chunk = 0
        self._results_call: ResultStream | None = None
        self._forward: ForwardStream | None = None
        self.failed: set[str] = set()  # workers found dead or hung: cleanup skips them
        self._abandoned = False  # given up for another pipeline (failover)

    # --- streams -----------------------------------------------------------------------

    def open(self) -> None:
        first, last = self.clients[0], self.clients[-1]
        self._results_call = last.results(self.pipeline_id)
        threading.Thread(target=self._read_results, name="results", daemon=True).start()
        # The last stage announces the subscription with an empty message; until then a
        # result could be published to nobody.
        if not self._subscribed.wait(self.settings.subscribe_deadline_s):
            raise self._broken or WorkerUnreachableError(
                last.address, f"results stream not open after "
                              f"{self.settings.subscribe_deadline_s:.0f} s")
        if self._broken is not None:
            raise self._broken
        self._forward = ForwardStream(first.channel, self._token)

    def _read_results(self) -> None:
        last = self.plan.stages[-1].worker
        try:
            for out in self._results_call:
                if out.announces_subscription:
                    self._subscribed.set()
                elif out.session_ended:
                    with self._lock:
                        self._results.pop(out.session, None)
                else:
                    with self._lock:  # a shared stage also carries other orchestrators'
                        mine = self._results.get(out.session)
                    if mine is not None:
                        mine.put(out)
            broken: OrchError = WorkerUnreachableError(last, "results stream ended")
        except OrchError as exc:
            broken = exc
        with self._lock:
            self._broken = self._broken or broken  # abandoned: its reason stays
            waiting = list(self._results.values())
        self._subscribed.set()
        for q in waiting:
            q.put(broken)

    def _queue(self, session: str) -> queue.SimpleQueue:
        with self._lock:
            return self._results.setdefault(session, queue.SimpleQueue())

    # --- steps -------------------------------------------------------------------------

    def send(self, session: str, start: int, tokens: Sequence[int], want_token: bool,
             sampling: SamplingParams | None = None, ring_left: int = 0,
             ring_stops: Sequence[int] = (), drafted: int = 0, draft_k: int = 0, *,
             draft_ahead: bool = False, score_rows: bool = False, next_token: int | None = None,
             copy_to: Sequence[str] = (), embed: bool = False) -> int:
        """Queue one chunk of ``session`` into stage 0; returns its chunk number. With
        ``ring_left`` the last stage goes on with that many tokens on its own (the token
        ring), as chunks numbered on from this one; each comes back to ``wait``. The last
        ``drafted`` tokens are drafts to verify; ``draft_k``: the ring drafts that many,
        and with ``draft_ahead`` sends each step before the verdict it assumes.
        ``score_rows`` (with ``next_token``), ``copy_to`` and ``embed``: see ``Chunk``."""
        step = Chunk(pipeline_id=self.pipeline_id, session=session, start_pos=start,
                     tokens=tuple(tokens), want_token=want_token, sampling=sampling,
                     ring_left=ring_left, ring_stops=tuple(ring_stops), drafted=drafted,
                     draft_k=draft_k, draft_ahead=draft_ahead and bool(draft_k),
                     score_rows=score_rows, next_token=next_token,
                     copy_to=tuple(copy_to), embed=embed,
                     rows=self.rows.take(tokens) if self.rows is not None else None)
        self._queue(session)  # results of this session are routed from now on
        chunk = self._send(step)
        if chunk is None:
            self.probe()
            raise WorkerUnreachableError(self.plan.stages[0].worker,
                                         f"input stream closed: {self._forward.problem()}")
        return chunk

    def _send(self, step: Chunk) -> int | None:
        """Number ``step`` and queue it, so chunk numbers reach stage 0 in increasing order;
        returns its number, None if the stream into stage 0 has closed."""
        with self._send_lock:
            with self._lock:  # the ring's chunks take the numbers after this one
                number = self._chunk
                self._chunk += TokenRing.numbers(step.ring_left)
            try:
                self._forward.send(replace(step, chunk=number))
            except ConnectionError:
                return None
        return number

    def wait(self, session: str, chunk: int) -> StageResult:
        """The result of ``chunk``; raises a typed error naming the failing worker."""
        deadline_s = self.settings.step_deadline_s
        give_up = time.monotonic() + deadline_s
        results = self._queue(session)
        while True:
            try:
                out = results.get(timeout=self.settings.probe_interval_s)
            except queue.Empty:
                self.probe()
                if time.monotonic() > give_up:
                    raise WorkerUnreachableError(
                        self.plan.stages[-1].worker,
                        f"no result after {deadline_s:.0f} s; every worker answers, so a stage "
                        f"is stuck: check the workers' logs") from None
                continue
            if isinstance(out, Exception):
                if not self._abandoned:
                    self.probe()  # a named stage failure explains a broken stream best
                raise out
            if out.error is not None:
                raise from_code(out.error.code, out.error.worker, out.error.message)
            if out.chunk == chunk:
                return out

    def end_session(self, session: str) -> None:
        """Free ``session`` on every stage (in order behind its chunks)."""
        if self._forward is None or self._forward.closed:
            return
        self._send(Chunk(pipeline_id=self.pipeline_id, session=session,
                         end_session=True))  # a broken stream ends them anyway

    # --- health ------------------------------------------------------------------------

    def probe(self) -> None:
        """Raise for the first stage that is dead, hung, faulty or lost the pipeline."""
        if self._abandoned:
            raise self._broken
        try:
            self._check_alive()
            fault: OrchError | None = None
            for stage, client in zip(self.plan.stages, self.clients, strict=True):
                try:
                    self._probe_stage(stage.index, client)
                except (WorkerUnreachableError, NotLoadedError):
                    raise
                except OrchError as exc:  # a later stage gone explains "next stage closed"
                    fault = fault or exc
            if fault is not None:
                raise fault
            if self._forward is not None and self._forward.closed:
                raise WorkerUnreachableError(self.plan.stages[0].worker,
                                             f"input stream closed: {self._forward.problem()}")
        except OrchError as exc:
            if isinstance(exc, WorkerUnreachableError):
                self.failed.add(exc.worker)
            raise self._with_stage(exc) from None

    def _check_alive(self) -> None:
        """The caller's own liveness check (local worker processes); a worker outside this
        plan (left out after a failure) is none of this pipeline's business."""
        if self._alive is None:
            return
        try:
            self._alive()
        except WorkerUnreachableError as exc:
            if self.plan.stage_of(exc.worker) is not None:
                raise

    def _probe_stage(self, index: int, client: WorkerClient) -> None:
        loaded = client.info(deadline=self.settings.probe_deadline_s).loaded
        if loaded is None or loaded.pipeline_id != self.pipeline_id:
            why = (f"another orchestrator took it over (it now runs layers {loaded.layers} "
                   f"of {loaded.model or 'a model'})" if loaded is not None
                   else "it was restarted or unloaded")
            lost = NotLoadedError(f"worker {client.address}: no longer holds this pipeline: "
                                  f"{why}")
            lost.worker = client.address
            raise lost
        if loaded.fault is not None:
            raise from_code(loaded.fault.code, client.address, loaded.fault.message)

    def _with_stage(self, exc: OrchError) -> OrchError:
        """``exc`` with the failing stage and its layers named after the worker."""
        stage = self.plan.stage_of(exc.worker) if exc.worker else None
        if stage is None:
            return exc
        where = f"stage {stage.index} (layers {stage.layers})"
        if isinstance(exc, WorkerUnreachableError):
            return WorkerUnreachableError(stage.worker, f"{where}: {exc.reason}")
        exc.args = (f"{exc} [{where}]",)
        return exc

    # --- lifetime ----------------------------------------------------------------------

    def abandon(self, reason: OrchError) -> None:
        """Give this pipeline up (a failover replaces it): steps waiting on it raise
        ``reason`` at once, without probing, and the streams close."""
        with self._lock:
            self._abandoned = True
            self._broken = reason
            waiting = list(self._results.values())
        for q in waiting:
            q.put(reason)
        self.close()

    def close(self) -> None:
        if self._forward is not None:
            self._forward.close()
        if self._results_call is not None:
            self._results_call.cancel()
