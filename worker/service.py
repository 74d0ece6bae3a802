"""The worker's gRPC service, served by ``worker.server.serve``.

Every call has had its token checked (``worker.server.TokenAuth``), maps our typed errors
to status codes through ``orchcore.wire.status``, and never blocks without a bound: the
long-lived streams end when the stage is unloaded or the peer goes away.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from orchcore import __version__
from orchcore.chunks import SUBSCRIBED
from orchcore.control import (
    FetchProgress,
    Lease,
    LinkMeasurement,
    LoadedStage,
    LoadReply,
    LoadRequest,
    ProbeResult,
    Proof,
    ShardReceipt,
    ShardUpload,
    SliceUpload,
    WorkerReport,
)
from orchcore.cpu import cpu_info, host_id, memory_info
from orchcore.discovery import Advert, proof
from orchcore.engine import StageEngine
from orchcore.errors import (
    GGUFError,
    InvalidInputError,
    MemoryBudgetError,
    NotLoadedError,
    OrchError,
)
from orchcore.facts import read_model_facts
from orchcore.files import write_atomic
from orchcore.memory import PROCESS_BASELINE_BYTES, estimate_shard
from orchcore.shard import LayerRange
from orchcore.slices import total_bytes
from orchcore.stagerole import StageRole
from orchcore.wire import PROTOCOL_VERSION, convert, status
from orchcore.wire import worker_pb2 as pb
from orchcore.wire import worker_pb2_grpc as pb_grpc
from orchcore.wire.channel import Link, connect, measure_link
from worker.admission import Admission, CurrentStage, ShardFacts, admit
from worker.baseline import trim_heap
from worker.probe import probe
from worker.rejects import RejectLog
from worker.settings import WorkerSettings
from worker.shardcache import ShardCache
from worker.slicefetch import Built, SliceFetcher
from worker.stage import Stage
from worker.tokens import Tokens

log = logging.getLogger(__name__)

_RECENT_PIPELINES = 16
_PROGRESS_EVERY_S = 0.2  # FetchShard progress messages at most this often
_LINK_DEADLINE_S = 10.0  # unloaded pipelines whose late messages are dropped quietly


def _rpc(method: Callable) -> Callable:
    """Abort with the status code of our typed errors, and the message as details."""

    @functools.wraps(method)
    def wrapper(self: WorkerService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except (OrchError, ValueError) as exc:
            _refuse(self, context, method.__name__, exc)

    return wrapper


def _rpc_stream(method: Callable) -> Callable:
    """``_rpc`` for calls that answer with a stream: errors raised while streaming too."""

    @functools.wraps(method)
    def wrapper(self: WorkerService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from method(self, request, context)
        except (OrchError, ValueError) as exc:
            _refuse(self, context, method.__name__, exc)

    return wrapper


def _refuse(service: WorkerService, context: grpc.ServicerContext, method: str,
            exc: Exception) -> None:
    """Answer a typed error with its status code and data-path code; one rate-limited line."""
    service.rejects.note(context.peer(), f"{method}: {exc}", logging.INFO)
    context.set_trailing_metadata(((status.ERROR_CODE_KEY, status.error_code(exc)),))
    context.abort(status.to_status(exc), str(exc))


def worker_id(state_dir: Path, *, renew: bool = False) -> str:
    """A random id made once per install and kept in its state folder (``renew``: make a
    new one, when a cloned machine's id turns out to be taken)."""
    path = state_dir / "worker-id"
    if renew or not path.exists():
        write_atomic(path, uuid.uuid4().hex + "\n")
    return path.read_text().strip()


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, settings: WorkerSettings, name: str, tokens: Tokens,
                 fingerprint: str = "", rejects: RejectLog | None = None,
                 baseline: int = 0) -> None:
        self.settings = settings
        self.name = name
        self.rejects = rejects or RejectLog()
        self.fingerprint = fingerprint  # of the TLS certificate served; "" for plaintext
        self.cache = ShardCache(settings.cache_dir, settings.cache_max_mb << 20)
        self.id = worker_id(settings.state_dir)
        self.tokens = tokens
        self.budget = settings.budget_bytes(memory_info().available)
        # What this process holds with nothing loaded (``worker.baseline``); 0 = unknown,
        # and the estimate assumes ``PROCESS_BASELINE_BYTES``.
        self.baseline = baseline
        self.host_id = host_id()
        self.stage: Stage | None = None
        self._unloaded: list[str] = []  # recently unloaded pipeline ids, newest last
        self._lock = threading.Lock()

    def threads(self, cores: int) -> int:
        """The llama.cpp threads this worker runs a stage with: its setting, at most its
        cores (Info reports it; a LoadShard that names none gets it)."""
        return self.settings.engine_threads(cores)

    @property
    def token(self) -> str | None:
        """The cluster token now (calls to other workers carry it)."""
        return self.tokens.current

    def add_to(self, server: grpc.Server) -> None:
        """Serve this worker's calls on ``server``."""
        pb_grpc.add_WorkerServicer_to_server(self, server)

    # --- info --------------------------------------------------------------------------

    @_rpc
    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.WorkerInfo:
        return convert.report_to_proto(self.report())

    def report(self) -> WorkerReport:
        """What this worker is and holds, now."""
        cpu, mem = cpu_info(), memory_info()
        return WorkerReport(
            protocol_version=PROTOCOL_VERSION, worker_id=self.id, hostname=socket.gethostname(),
            software_version=__version__, ram_total_bytes=mem.total,
            ram_available_bytes=mem.available, memory_budget_bytes=self.budget,
            cores=cpu.cores, cpu_model=cpu.model, cpu_flags=tuple(sorted(cpu.flags)),
            arch=cpu.arch, cached_shards=tuple(self.cache.list()),
            loaded=_loaded(self.stage), host_id=self.host_id,
            cache_used_bytes=self.cache.used_bytes(), cache_free_bytes=self.cache.free_bytes(),
            cache_max_bytes=self.cache.max_bytes, threads=self.threads(cpu.cores),
            baseline_bytes=self.baseline)

    # --- shards ------------------------------------------------------------------------

    @_rpc
    def UploadShard(self, request_iterator: Iterator[pb.ShardChunk],
                    context: grpc.ServicerContext) -> pb.ShardReceipt:
        upload = convert.upload_from_proto(request_iterator)
        if isinstance(upload, SliceUpload):
            return convert.receipt_to_proto(self._receive_slice(upload))
        return convert.receipt_to_proto(self._store_shard(upload))

    def _store_shard(self, upload: ShardUpload) -> ShardReceipt:
        """A whole shard, stored by its sha256 (the tests' and fuzzers' way in)."""
        if self.cache.has(upload.sha256):
            return ShardReceipt(upload.sha256, upload.size, already_cached=True)
        stage = self.stage
        evicted = self.cache.make_room(upload.size, {stage.sha256} if stage else set())
        if evicted:
            log.info("evicted %d least recently used shards to make room", len(evicted))
        self.cache.store(upload.sha256, upload.size, upload.data)
        log.info("stored shard %s (%d bytes)", upload.sha256[:12], upload.size)
        return ShardReceipt(upload.sha256, upload.size)

    def _receive_slice(self, upload: SliceUpload) -> ShardReceipt:
        """A slice of the model sent by the orchestrator: cut into the shard here."""
        stage = self.stage
        built = None
        for step in SliceFetcher(self.cache, self.name).receive(
                upload.files, upload.ranges, upload.layers,
                {stage.sha256} if stage else set(), upload.data):
            if isinstance(step, Built):
                built = step
        return ShardReceipt(built.sha256, built.size, already_cached=not built.fetched)

    @_rpc
    def FindShard(self, request: pb.ShardSlice, context: grpc.ServicerContext
                  ) -> pb.ShardReceipt:
        files, _, layers = convert.slice_from_proto(request)
        found = SliceFetcher(self.cache, self.name).find(files, layers)
        if found is None:
            return convert.receipt_to_proto(ShardReceipt("", 0))
        self.cache.touch(found.sha256)
        return convert.receipt_to_proto(ShardReceipt(found.sha256, found.size,
                                                     already_cached=True))

    @_rpc
    def RotateToken(self, request: pb.RotateTokenRequest, context: grpc.ServicerContext
                    ) -> pb.RotateTokenReply:
        grace = self.settings.token_grace_s
        self.tokens.rotate(convert.rotate_from_proto(request), grace)
        return convert.grace_to_proto(grace)

    @_rpc_stream
    def FetchShard(self, request: pb.FetchShardRequest, context: grpc.ServicerContext
                   ) -> Iterator[pb.FetchProgress]:
        files, ranges, layers = convert.fetch_from_proto(request)
        total, last = total_bytes(ranges), 0.0
        stage = self.stage
        for step in SliceFetcher(self.cache, self.name).build(
                files, ranges, layers, {stage.sha256} if stage else set()):
            if isinstance(step, Built):
                yield convert.progress_to_proto(FetchProgress(total, total, ShardReceipt(
                    step.sha256, step.size, already_cached=not step.fetched)))
            elif time.monotonic() - last >= _PROGRESS_EVERY_S:
                last = time.monotonic()
                yield convert.progress_to_proto(FetchProgress(step, total))

    @_rpc
    def LoadShard(self, request: pb.LoadShardRequest, context: grpc.ServicerContext
                  ) -> pb.LoadShardReply:
        started = time.perf_counter()
        cores = cpu_info().cores
        asked = convert.load_from_proto(request, self.threads(cores), cores)
        cached = self.cache.has(asked.sha256)
        if cached:
            self.cache.touch(asked.sha256)
        shard = self._shard_facts(asked) if cached else ShardFacts()
        with self._lock:
            current, now = self.stage, time.monotonic()
            seen = None if current is None else CurrentStage(
                current.request, len(current.leases.others(asked.holder, now)),
                current.loaded_at)
            decision = admit(asked, cached=cached, current=seen, shard=shard,
                             budget=self.budget)
            if decision is Admission.SHARE:
                current.leases.hold(asked.holder, now)
                log.info("layers %s shared with pipeline %s", asked.layers,
                         current.pipeline_id)
                return convert.load_reply_to_proto(LoadReply(
                    current.resident_bytes, 0.0, current.engine.config, current.pipeline_id,
                    shared=True))
            self._unload()
            # What the upload, a probe and the stage before freed stays in glibc's arenas
            # unless given back: 0-41 MiB of an 8B's upload, by chance, on top of the stage.
            trim_heap()
            self.stage = self._build(asked, shard.needed.total)
            self.stage.leases.hold(asked.holder, time.monotonic())
        log.info("loaded layers %s for pipeline %s", asked.layers, asked.pipeline_id)
        return convert.load_reply_to_proto(LoadReply(
            shard.needed.total, time.perf_counter() - started, asked.engine,
            asked.pipeline_id))

    def _shard_facts(self, asked: LoadRequest) -> ShardFacts:
        """What the cached shard ``asked`` names is, read from its header."""
        try:
            facts = read_model_facts(self.cache.path(asked.sha256))
            role = StageRole.of(facts)
            return ShardFacts(LayerRange(role.start, role.end),
                              estimate_shard(facts, asked.engine, self.baseline))
        except GGUFError as exc:  # name what the user asked for, not our cache file
            return ShardFacts(problem=exc.problem)

    def _build(self, asked: LoadRequest, resident_bytes: int) -> Stage:
        what = (f"the shard of layers {asked.layers} of {asked.model or 'the model'}")
        engine = StageEngine(self.cache.path(asked.sha256), asked.engine, label=what)
        try:
            return Stage(engine, asked, worker_name=self.name, token=self.token,
                         max_message_bytes=self.settings.max_message_mb << 20,
                         connect=self.connect, resident_bytes=resident_bytes,
                         spin_s=self.settings.spin_ms / 1e3)
        except BaseException:
            engine.close()
            raise

    @_rpc
    def Renew(self, request: pb.RenewRequest, context: grpc.ServicerContext) -> pb.RenewReply:
        lease = convert.lease_from_proto(request)
        with self._lock:
            stage = self.stage
            held = stage is not None and stage.pipeline_id == lease.pipeline_id and \
                stage.leases.renew(lease.holder, time.monotonic())
        return convert.renewed_to_proto(held)

    @_rpc
    def Unload(self, request: pb.UnloadRequest, context: grpc.ServicerContext
               ) -> pb.UnloadReply:
        return convert.unloaded_to_proto(self._unload_lease(convert.lease_from_proto(request)))

    def _unload_lease(self, lease: Lease) -> bool:
        """Drop ``lease``; the stage goes when no other lease is left. Whether the pipeline
        (any, for an empty id) was loaded."""
        with self._lock:
            stage = self.stage
            if stage is None or (lease.pipeline_id and stage.pipeline_id != lease.pipeline_id):
                return False
            stage.leases.drop(lease.holder)
            if lease.holder and stage.leases.others(lease.holder, time.monotonic()):
                return True  # still held by another orchestrator
            self._unload()
        return True

    def _unload(self) -> None:
        if self.stage is not None:
            stage, self.stage = self.stage, None
            self._unloaded = [*self._unloaded[-_RECENT_PIPELINES + 1:], stage.pipeline_id]
            stage.close()

    # --- data path ---------------------------------------------------------------------

    def _current(self, pipeline_id: str) -> Stage:
        stage = self.stage
        if stage is None or stage.pipeline_id != pipeline_id:
            raise NotLoadedError(f"pipeline {pipeline_id!r} is not loaded here")
        return stage

    @_rpc
    def Forward(self, request_iterator: Iterator[pb.StageInput],
                context: grpc.ServicerContext) -> pb.ForwardSummary:
        count = 0
        for chunk in convert.chunks_from_proto(request_iterator, self.name):
            if chunk.pipeline_id in self._unloaded:
                continue  # in flight while its pipeline was unloaded: nothing to do
            self._current(chunk.pipeline_id).submit(chunk)
            count += 1
        return convert.forwarded_to_proto(count)

    def Results(self, request: pb.ResultsRequest, context: grpc.ServicerContext
                ) -> Iterator[pb.StageOutput]:
        pipeline_id = convert.subscribe_from_proto(request)
        try:
            stage = self._current(pipeline_id)
        except OrchError as exc:
            context.abort(status.to_status(exc), str(exc))
        if not stage.is_last:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"not the last stage of {pipeline_id}")
        q = stage.subscribers.subscribe()
        context.add_callback(lambda: stage.subscribers.unsubscribe(q))
        # subscribed: results published from now on reach this stream
        yield convert.result_to_proto(SUBSCRIBED)
        while (out := q.get()) is not None:
            yield convert.result_to_proto(out)

    def Prove(self, request: pb.ProveRequest, context: grpc.ServicerContext) -> pb.ProveReply:
        nonce = convert.nonce_from_proto(request)
        if not 16 <= len(nonce) <= 64:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a nonce of 16 to 64 bytes")

        def answer(token: str | None) -> bytes:
            return proof(token, nonce, b"worker", self.fingerprint) if token else b""

        return convert.proof_to_proto(Proof(answer(self.tokens.current),
                                            answer(self.tokens.previous), self.id))

    @_rpc
    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingReply:
        return convert.ping_reply_to_proto(convert.ping_from_proto(request))

    @_rpc
    def MeasureLink(self, request: pb.MeasureLinkRequest, context: grpc.ServicerContext
                    ) -> pb.LinkMeasure:
        return convert.link_to_proto(self.measure_link_to(
            *convert.measure_link_from_proto(request)))

    def measure_link_to(self, address: str, payload_bytes: int) -> LinkMeasurement:
        """This worker's link to the worker at ``address`` (a payload of 1 MiB unless told,
        16 MiB at most); a measurement that could not be made says why."""
        try:
            link = self.connect(address)
        except OrchError as exc:
            return LinkMeasurement(error=str(exc))
        try:
            rtt, bandwidth = measure_link(link.channel, self.token,
                                          min(payload_bytes or 1 << 20, 16 << 20),
                                          _LINK_DEADLINE_S)
        except grpc.RpcError as exc:
            return LinkMeasurement(error=f"{exc.code().name}: {exc.details()}")
        finally:
            link.close()
        return LinkMeasurement(rtt, bandwidth)

    def connect(self, address: str) -> Link:
        """A link to another worker that proved it holds our token (the next stage, a link
        measurement's peer)."""
        return connect(address, self.token, allow_plaintext=self.settings.plaintext,
                       timeout_s=_LINK_DEADLINE_S,
                       max_message_bytes=self.settings.max_message_mb << 20
                       ).require_proven(self.token)

    @_rpc
    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeReply:
        shape = convert.shape_from_proto(request)
        if (problem := shape.problem()) is not None:
            raise InvalidInputError(f"not a layer shape to probe: {problem}")
        room = max(0, self.budget - (self.baseline or PROCESS_BASELINE_BYTES))
        layers = shape.layers_within(room)
        if not layers:
            raise MemoryBudgetError(
                f"too small to time this model: one of its layers needs "
                f"{shape.probe_layer_bytes() >> 20} MiB, {room >> 20} MiB of the memory "
                f"budget are left beside the worker process itself")
        threads = self.settings.threads or cpu_info().cores
        return convert.probe_result_to_proto(ProbeResult(
            *probe(shape, self.settings.cache_dir, threads, layers)))

    def renew_id(self) -> str:
        self.id = worker_id(self.settings.state_dir, renew=True)
        return self.id

    def advert(self, port: int) -> Advert:
        return Advert(worker_id=self.id, protocol=PROTOCOL_VERSION, arch=cpu_info().arch,
                      cores=cpu_info().cores, budget_mb=self.budget >> 20, port=port,
                      fingerprint=self.fingerprint)

    @_rpc
    def EndSession(self, request: pb.EndSessionRequest, context: grpc.ServicerContext
                   ) -> pb.EndSessionReply:
        session, stage = convert.end_session_from_proto(request), self.stage
        if stage is None:
            return convert.session_ended_to_proto(False)
        existed = session in stage.engine.sessions
        stage.end_session_here(session)
        return convert.session_ended_to_proto(existed)

    def status(self) -> str:
        """One line on what this worker is doing (systemd's STATUS=)."""
        stage = self.stage
        if stage is None:
            return f"worker {self.id[:8]} on {self.name}: no layers loaded"
        role, sessions = stage.engine.role, len(stage.engine.sessions)
        line = (f"worker {self.id[:8]} on {self.name}: layers [{role.start}, {role.end}) of "
                f"{stage.request.model or 'a model'}, {sessions} session"
                f"{'' if sessions == 1 else 's'}")
        return line + (f"; fault: {stage.fault.message}" if stage.fault is not None else "")

    def close(self) -> None:
        with self._lock:
            self._unload()


def _loaded(stage: Stage | None) -> LoadedStage | None:
    """What Info reports of ``stage``."""
    if stage is None:
        return None
    role = stage.engine.role
    return LoadedStage(
        sha256=stage.sha256, layer_start=role.start, layer_end=role.end,
        source_layers=role.source_layers, pipeline_id=stage.pipeline_id,
        resident_bytes=stage.resident_bytes, fault=stage.fault,
        holders=tuple(stage.leases.holders(time.monotonic())), model=stage.request.model,
        sessions=stage.engine.session_count)
