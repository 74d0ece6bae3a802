"""Calls a worker refuses: one log line each, a few per peer a minute at most.

Anyone who can reach the port can send garbage, so a refusal must cost a line, not a
traceback, and a flood from one machine must not fill the disk. ``RejectLog`` keeps per
peer host a window of ``LINES_PER_WINDOW`` lines, then counts the rest and says how many
it left out when the window ends. ``CheckedRequests`` is the server interceptor that turns
a message protobuf cannot decode into an ``INVALID_ARGUMENT`` answer (gRPC alone would log
a traceback and answer ``INTERNAL``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError

from orchcore.errors import InvalidInputError

log = logging.getLogger(__name__)

LINES_PER_WINDOW = 5
WINDOW_S = 60.0
MAX_PEERS = 1024  # peers remembered at once; the oldest window is forgotten first


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string: 'ipv4:10.0.0.2:5555' -> '10.0.0.2',
    'ipv6:[::1]:5555' -> '::1'."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return peer


class _Window(NamedTuple):
    start: float
    logged: int
    left_out: int


class RejectLog:
    def __init__(self, lines: int = LINES_PER_WINDOW, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self.lines = lines
        self.window_s = window_s
        self._clock = clock
        self._log = logger
        self._peers: dict[str, _Window] = {}
        self._lock = threading.Lock()
        self.total = 0  # every refusal noted, logged or not

    def note(self, peer: str, what: str, level: int = logging.WARNING) -> None:
        """Log that a call from ``peer`` was refused for ``what``, unless that peer has had
        its lines for this window (the summary at the window's end counts them)."""
        host, now = peer_host(peer), self._clock()
        with self._lock:
            self.total += 1
            window = self._peers.get(host)
            if window is None or now - window.start >= self.window_s:
                if window is not None and window.left_out:
                    self._log.warning("%d more calls from %s were refused in %.0f s "
                                      "(not logged one by one)", window.left_out, host,
                                      now - window.start)
                window = _Window(now, 0, 0)
                if host not in self._peers and len(self._peers) >= MAX_PEERS:
                    del self._peers[min(self._peers, key=lambda h: self._peers[h].start)]
            if window.logged < self.lines:
                self._log.log(level, "refused a call from %s: %s", host, what)
                window = window._replace(logged=window.logged + 1)
            else:
                window = window._replace(left_out=window.left_out + 1)
            self._peers[host] = window


class _Malformed(NamedTuple):
    size: int
    error: str

    def describe(self, method: str) -> str:
        return f"{method}: a {self.size}-byte message that is not a valid request ({self.error})"


def _checked(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data) if deserialize else data
        except DecodeError as exc:
            return _Malformed(len(data), str(exc) or "undecodable")

    return parse


_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _behavior(handler: grpc.RpcMethodHandler) -> Callable:
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream)


class CheckedRequests(grpc.ServerInterceptor):
    """Malformed messages become ``INVALID_ARGUMENT``, logged through ``RejectLog``.

    A malformed first (or only) request is refused before the method runs. In a request
    stream, the method meets it as ``InvalidInputError`` raised by the iterator, which its
    typed-error handling answers the same way."""

    def __init__(self, rejects: RejectLog) -> None:
        self._rejects = rejects

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails
                          ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rpartition("/")[2]
        inner = _behavior(handler)

        if handler.request_streaming:
            def behavior(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                return inner(_refuse_malformed(requests, method), context)
        else:
            def behavior(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, _Malformed):
                    self._rejects.note(context.peer(), request.describe(method))
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe(method))
                return inner(request, context)

        make = _KINDS[(handler.request_streaming, handler.response_streaming)]
        return make(behavior, request_deserializer=_checked(handler.request_deserializer),
                    response_serializer=handler.response_serializer)


def _refuse_malformed(requests: Iterator[Any], method: str) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, _Malformed):
            raise InvalidInputError(request.describe(method))
        yield request
