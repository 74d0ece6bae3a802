"""The worker's gRPC service: ``orch worker`` runs ``serve(settings)``.

Every call is authenticated when a cluster token is set (``TokenAuth``), maps our typed
errors to status codes through ``orchcore.wire.status``, and never blocks without a
bound: the long-lived streams end when the stage is unloaded or the peer goes away.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from orchcore import __version__, clustertoken
from orchcore.chunks import SUBSCRIBED
from orchcore.control import LoadReply, LoadRequest
from orchcore.cpu import cpu_info, host_id, memory_info
from orchcore.discovery import Advert, proof
from orchcore.engine import StageEngine, StageRole
from orchcore.errors import (
    GGUFError,
    InvalidInputError,
    InvalidSettingError,
    NotLoadedError,
    OrchError,
)
from orchcore.facts import read_model_facts
from orchcore.files import write_atomic
from orchcore.memory import estimate_shard
from orchcore.probe import LayerShape
from orchcore.shard import LayerRange
from orchcore.slices import total_bytes
from orchcore.wire import PROTOCOL_VERSION, convert, status
from orchcore.wire import worker_pb2 as pb
from orchcore.wire import worker_pb2_grpc as pb_grpc
from orchcore.wire.channel import Link, connect, measure_link, server_options
from orchcore.wire.tls import load_identity, short
from worker.admission import Admission, CurrentStage, ShardFacts, admit
from worker.advertise import Advertiser, advertised_addresses
from worker.probe import probe
from worker.rejects import CheckedRequests, RejectLog
from worker.settings import WorkerSettings
from worker.shardcache import ShardCache
from worker.slicefetch import Built, SliceFetcher
from worker.stage import Stage
from worker.supervision import SelfCheck, Supervision
from worker.tokens import Tokens

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PROVE = "/orch.v1.Worker/Prove"  # the one call without a token: it proves ours
_RECENT_PIPELINES = 16
_PROGRESS_EVERY_S = 0.2  # FetchShard progress messages at most this often
_LINK_DEADLINE_S = 10.0  # unloaded pipelines whose late messages are dropped quietly
_UNAUTHENTICATED = ("missing or wrong cluster token: give the orchestrator the same token "
                    "as the workers (--token or ORCH_TOKEN)")


class TokenAuth(grpc.ServerInterceptor):
    """Rejects every call whose ``authorization`` metadata lacks the cluster token."""

    def __init__(self, tokens: Tokens, rejects: RejectLog) -> None:
        self._tokens = tokens
        self._rejects = rejects

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails
                          ) -> grpc.RpcMethodHandler | None:
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if details.method == _PROVE or self._tokens.accepts(given.removeprefix("Bearer ")):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        return _denied(handler, self._rejects)


def _denied(handler: grpc.RpcMethodHandler, rejects: RejectLog) -> grpc.RpcMethodHandler:
    def deny(_request: Any, context: grpc.ServicerContext) -> None:
        rejects.note(context.peer(), "no cluster token, or a wrong one")
        context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


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
                 fingerprint: str = "", rejects: RejectLog | None = None) -> None:
        self.settings = settings
        self.name = name
        self.rejects = rejects or RejectLog()
        self.fingerprint = fingerprint  # of the TLS certificate served; "" for plaintext
        self.cache = ShardCache(settings.cache_dir, settings.cache_max_mb << 20)
        self.id = worker_id(settings.state_dir)
        self.tokens = tokens
        self.budget = settings.budget_bytes(memory_info().available)
        self.host_id = host_id()
        self.stage: Stage | None = None
        self._unloaded: list[str] = []  # recently unloaded pipeline ids, newest last
        self._lock = threading.Lock()

    def threads(self, cores: int) -> int:
        """The llama.cpp threads this worker runs a stage with: its setting, at most its
        cores (Info reports it; a LoadShard that names none gets it)."""
        return min(self.settings.threads or cores, cores)

    @property
    def token(self) -> str | None:
        """The cluster token now (calls to other workers carry it)."""
        return self.tokens.current

    # --- info --------------------------------------------------------------------------

    @_rpc
    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.WorkerInfo:
        cpu, mem = cpu_info(), memory_info()
        info = pb.WorkerInfo(
            protocol_version=PROTOCOL_VERSION, worker_id=self.id, hostname=socket.gethostname(),
            software_version=__version__, ram_total_bytes=mem.total,
            ram_available_bytes=mem.available, memory_budget_bytes=self.budget,
            cores=cpu.cores, cpu_model=cpu.model, cpu_flags=sorted(cpu.flags), arch=cpu.arch,
            cached_shards=self.cache.list(), host_id=self.host_id,
            cache_used_bytes=self.cache.used_bytes(), cache_free_bytes=self.cache.free_bytes(),
            cache_max_bytes=self.cache.max_bytes,
            threads=self.threads(cpu.cores))
        stage = self.stage
        if stage is not None:
            role = stage.engine.role
            info.loaded.CopyFrom(pb.LoadedShard(
                sha256=stage.sha256, layer_start=role.start, layer_end=role.end,
                source_layers=role.source_layers, pipeline_id=stage.pipeline_id,
                resident_bytes=stage.resident_bytes, model=stage.request.model,
                sessions=stage.engine.session_count,
                holders=convert.holders_to_proto(stage.leases.holders(time.monotonic()))))
            if stage.fault is not None:
                info.loaded.fault.CopyFrom(convert.error_to_proto(stage.fault))
        return info

    # --- shards ------------------------------------------------------------------------

    @_rpc
    def UploadShard(self, request_iterator: Iterator[pb.ShardChunk],
                    context: grpc.ServicerContext) -> pb.ShardReceipt:
        header = next(request_iterator, None)
        if header is not None and header.HasField("slice"):
            return self._receive_slice(header, request_iterator)
        if header is None or not header.sha256:
            raise InvalidInputError("UploadShard: the first message must name sha256 and size"
                                    ", or a slice")
        if self.cache.has(header.sha256):
            return pb.ShardReceipt(sha256=header.sha256, size=header.size, already_cached=True)
        stage = self.stage
        evicted = self.cache.make_room(header.size, {stage.sha256} if stage else set())
        if evicted:
            log.info("evicted %d least recently used shards to make room", len(evicted))
        chunks = (c.data for c in _prepend(header, request_iterator) if c.data)
        self.cache.store(header.sha256, header.size, chunks)
        log.info("stored shard %s (%d bytes)", header.sha256[:12], header.size)
        return pb.ShardReceipt(sha256=header.sha256, size=header.size)

    def _receive_slice(self, header: pb.ShardChunk, rest: Iterator[pb.ShardChunk]
                       ) -> pb.ShardReceipt:
        """A slice of the model sent by the orchestrator: cut into the shard here."""
        files, ranges, layers = convert.slice_from_proto(header.slice)
        if header.size != total_bytes(ranges):
            raise InvalidInputError(f"UploadShard: the slice's ranges hold "
                                    f"{total_bytes(ranges)} bytes, not the announced "
                                    f"{header.size}")
        stage = self.stage
        data = (c.data for c in _prepend(header, rest) if c.data)
        built = None
        for step in SliceFetcher(self.cache, self.name).receive(
                files, ranges, layers, {stage.sha256} if stage else set(), data):
            if isinstance(step, Built):
                built = step
        return pb.ShardReceipt(sha256=built.sha256, size=built.size,
                               already_cached=not built.fetched)

    @_rpc
    def FindShard(self, request: pb.ShardSlice, context: grpc.ServicerContext
                  ) -> pb.ShardReceipt:
        files, _, layers = convert.slice_from_proto(request)
        found = SliceFetcher(self.cache, self.name).find(files, layers)
        if found is None:
            return pb.ShardReceipt()
        self.cache.touch(found.sha256)
        return pb.ShardReceipt(sha256=found.sha256, size=found.size, already_cached=True)

    @_rpc
    def RotateToken(self, request: pb.RotateTokenRequest, context: grpc.ServicerContext
                    ) -> pb.RotateTokenReply:
        grace = self.settings.token_grace_s
        self.tokens.rotate(request.new_token, grace)
        return pb.RotateTokenReply(grace_s=grace)

    @_rpc_stream
    def FetchShard(self, request: pb.FetchShardRequest, context: grpc.ServicerContext
                   ) -> Iterator[pb.FetchProgress]:
        files, ranges, layers = convert.fetch_from_proto(request)
        total, last = total_bytes(ranges), 0.0
        stage = self.stage
        for step in SliceFetcher(self.cache, self.name).build(
                files, ranges, layers, {stage.sha256} if stage else set()):
            if isinstance(step, Built):
                yield pb.FetchProgress(done=total, total=total, shard=pb.ShardReceipt(
                    sha256=step.sha256, size=step.size, already_cached=not step.fetched))
            elif time.monotonic() - last >= _PROGRESS_EVERY_S:
                last = time.monotonic()
                yield pb.FetchProgress(done=step, total=total)

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
                              estimate_shard(facts, asked.engine))
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
        with self._lock:
            stage = self.stage
            held = stage is not None and stage.pipeline_id == request.pipeline_id and \
                stage.leases.renew(request.holder, time.monotonic())
        return pb.RenewReply(held=held)

    @_rpc
    def Unload(self, request: pb.UnloadRequest, context: grpc.ServicerContext
               ) -> pb.UnloadReply:
        with self._lock:
            stage = self.stage
            if stage is None or (request.pipeline_id and
                                 stage.pipeline_id != request.pipeline_id):
                return pb.UnloadReply(was_loaded=False)
            stage.leases.drop(request.holder)
            if request.holder and stage.leases.others(request.holder, time.monotonic()):
                return pb.UnloadReply(was_loaded=True)  # still held by another orchestrator
            self._unload()
        return pb.UnloadReply(was_loaded=True)

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
        for msg in request_iterator:
            if msg.pipeline_id in self._unloaded:
                continue  # in flight while its pipeline was unloaded: nothing to do
            self._current(msg.pipeline_id).submit(convert.chunk_from_proto(msg, self.name))
            count += 1
        return pb.ForwardSummary(chunks=count)

    def Results(self, request: pb.ResultsRequest, context: grpc.ServicerContext
                ) -> Iterator[pb.StageOutput]:
        try:
            stage = self._current(request.pipeline_id)
        except OrchError as exc:
            context.abort(status.to_status(exc), str(exc))
        if not stage.is_last:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"not the last stage of {request.pipeline_id}")
        q = stage.subscribers.subscribe()
        context.add_callback(lambda: stage.subscribers.unsubscribe(q))
        # subscribed: results published from now on reach this stream
        yield convert.result_to_proto(SUBSCRIBED)
        while (out := q.get()) is not None:
            yield convert.result_to_proto(out)

    def Prove(self, request: pb.ProveRequest, context: grpc.ServicerContext) -> pb.ProveReply:
        if not 16 <= len(request.nonce) <= 64:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a nonce of 16 to 64 bytes")
        current, previous = self.tokens.current, self.tokens.previous
        return pb.ProveReply(
            proof=proof(current, request.nonce, b"worker", self.fingerprint) if current else b"",
            previous_proof=proof(previous, request.nonce, b"worker", self.fingerprint)
            if previous else b"",
            worker_id=self.id)

    @_rpc
    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingReply:
        return pb.PingReply(received=len(request.payload))

    @_rpc
    def MeasureLink(self, request: pb.MeasureLinkRequest, context: grpc.ServicerContext
                    ) -> pb.LinkMeasure:
        try:
            link = self.connect(request.address)
        except OrchError as exc:
            return pb.LinkMeasure(error=str(exc))
        try:
            rtt, bandwidth = measure_link(link.channel, self.token,
                                          min(request.payload_bytes or 1 << 20, 16 << 20),
                                          _LINK_DEADLINE_S)
        except grpc.RpcError as exc:
            return pb.LinkMeasure(error=f"{exc.code().name}: {exc.details()}")
        finally:
            link.close()
        return pb.LinkMeasure(rtt_s=rtt, bandwidth_bytes_s=bandwidth)

    def connect(self, address: str) -> Link:
        """A link to another worker that proved it holds our token (the next stage, a link
        measurement's peer)."""
        return connect(address, self.token, allow_plaintext=self.settings.plaintext,
                       timeout_s=_LINK_DEADLINE_S,
                       max_message_bytes=self.settings.max_message_mb << 20
                       ).require_proven(self.token)

    @_rpc
    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeReply:
        shape = LayerShape(arch=request.arch, n_embd=request.n_embd, n_ff=request.n_ff,
                           n_head=request.n_head, n_head_kv=request.n_head_kv,
                           weight_type=request.weight_type, layer_bytes=request.layer_bytes)
        if (problem := shape.problem(self.budget // 2)) is not None:
            raise InvalidInputError(f"not a layer shape to probe: {problem}")
        threads = self.settings.threads or cpu_info().cores
        decode, prefill, cached = probe(shape, self.settings.cache_dir, threads)
        return pb.ProbeReply(decode_s_per_layer=decode, prefill_s_per_token_per_layer=prefill,
                             cached=cached)

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
        stage = self.stage
        if stage is None:
            return pb.EndSessionReply(existed=False)
        existed = request.session in stage.engine.sessions
        stage.end_session_here(request.session)
        return pb.EndSessionReply(existed=existed)

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


def _prepend(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _reachable_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return host


def _die_with(parent_pid: int) -> None:
    """SIGTERM this process when ``parent_pid`` exits (Linux PR_SET_PDEATHSIG); exit now if
    it already has."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        raise SystemExit(f"parent process {parent_pid} is gone")


def serve(settings: WorkerSettings, *, stop: threading.Event | None = None) -> None:
    """Run a worker until SIGTERM/SIGINT (or ``stop`` is set)."""
    if settings.parent_pid:
        _die_with(settings.parent_pid)
    max_bytes = settings.max_message_mb << 20
    loopback = clustertoken.is_loopback(settings.host)
    given = settings.token.get_secret_value() or None if settings.token else None
    if given is not None and (warning := clustertoken.require(
            given, loopback=loopback, source="ORCH_WORKER_TOKEN (--token)")):
        log.warning("%s", warning)
    tokens = Tokens.load(given, settings.state_dir, loopback=loopback)
    rejects = RejectLog()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="rpc"),
                         interceptors=[TokenAuth(tokens, rejects), CheckedRequests(rejects)],
                         options=server_options(max_bytes))
    identity = None if settings.plaintext else load_identity(settings.state_dir)
    try:
        port = server.add_insecure_port(f"{settings.host}:{settings.port}") if identity is None \
            else server.add_secure_port(f"{settings.host}:{settings.port}",
                                        grpc.ssl_server_credentials([(identity.key_pem,
                                                                      identity.cert_pem)]))
    except RuntimeError as exc:  # gRPC's way of saying the address is taken or invalid
        raise InvalidSettingError(f"cannot listen on {settings.host}:{settings.port} ({exc}); "
                                  f"is another worker using the port? Choose another with "
                                  f"--port") from None
    name = f"{settings.host}:{port}"
    service = WorkerService(settings, name, tokens, identity.fingerprint if identity else "",
                            rejects)
    pb_grpc.add_WorkerServicer_to_server(service, server)
    server.start()
    if not tokens.current and not loopback:
        log.warning("no cluster token set: anyone on the network can use this worker")
    if identity is None and not loopback:
        log.warning("serving without TLS (plaintext): the token and all data cross the "
                    "network in the clear")
    log.info("worker %s listening on %s, %s (cache %s)", service.id[:8], name,
             f"TLS certificate {short(identity.fingerprint)}" if identity else "plaintext",
             settings.cache_dir)
    advertiser = Advertiser(advertised_addresses(settings.discovery, settings.host),
                            lambda: service.advert(port), service.renew_id)
    advertiser.start()
    if settings.ready_file:  # an address others can connect to, even when bound to all
        write_atomic(settings.ready_file, f"{_reachable_host(settings.host)}:{port}")
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    check = SelfCheck(f"{_reachable_host(settings.host)}:{port}", lambda: tokens.current,
                      identity.cert_pem if identity else None)
    supervision = Supervision.from_environ(check, service.status, settings.watchdog_floor_s)
    try:
        supervision.ready()  # systemd (Type=notify): serving and advertised
        # Wake up every second: a signal delivered to another thread (as after SIGSTOP and
        # SIGCONT) only runs its Python handler once the main thread wakes.
        while not stop.wait(1.0):
            pass
        log.info("worker %s stopping", name)
    finally:
        supervision.close()
        check.close()
        advertiser.close()
        server.stop(grace=2).wait(5)
        service.close()
