"""The worker process: ``orch worker`` runs ``serve(settings)``, which listens (TLS unless
told otherwise), checks every call's token (``TokenAuth``), advertises the worker, tells
systemd how it is (``worker.supervision``) and serves ``WorkerService`` until stopped.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from orchcore import clustertoken
from orchcore.cpu import cpu_info
from orchcore.errors import InvalidSettingError
from orchcore.files import write_atomic
from orchcore.wire.channel import server_options
from orchcore.wire.tls import load_identity, short
from worker.advertise import Advertiser, advertised_addresses
from worker.baseline import process_baseline
from worker.rejects import CheckedRequests, RejectLog
from worker.service import WorkerService
from worker.settings import WorkerSettings
from worker.supervision import SelfCheck, Supervision
from worker.tokens import Tokens

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PROVE = "/orch.v1.Worker/Prove"  # the one call without a token: it proves ours
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
    baseline = process_baseline(settings.state_dir, settings.engine_threads(cpu_info().cores))
    service = WorkerService(settings, name, tokens, identity.fingerprint if identity else "",
                            rejects, baseline)
    service.add_to(server)
    server.start()
    if not tokens.current and not loopback:
        log.warning("no cluster token set: anyone on the network can use this worker")
    if identity is None and not loopback:
        log.warning("serving without TLS (plaintext): the token and all data cross the "
                    "network in the clear")
    log.info("worker %s listening on %s, %s (cache %s; %d MiB with nothing loaded)",
             service.id[:8], name,
             f"TLS certificate {short(identity.fingerprint)}" if identity else "plaintext",
             settings.cache_dir, baseline >> 20)
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
