"""Channels and streams, the same for the orchestrator and for worker-to-worker links.

Keepalive: clients ping an idle connection every ``KEEPALIVE_S`` so a dead peer is
noticed; servers accept pings that often (``server_options``). The two must agree: a
server's default minimum is 5 minutes, and a client pinging more often than that gets a
GOAWAY "too_many_pings" after two strikes, which killed idle chats after ~45 s.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import grpc

from orchcore.wire import worker_pb2 as pb
from orchcore.wire import worker_pb2_grpc as pb_grpc

KEEPALIVE_S = 20.0  # idle connections ping this often (orchestrator and workers alike)
KEEPALIVE_TIMEOUT_S = 10.0  # a ping unanswered this long closes the connection
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


def _limits(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def client_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
                   ) -> list[tuple[str, int]]:
    return [*_limits(max_message_bytes),
            ("grpc.keepalive_time_ms", int(KEEPALIVE_S * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
                   ) -> list[tuple[str, int]]:
    """Accept the clients' keepalive pings (at half their interval, for clock slack)."""
    return [*_limits(max_message_bytes),
            ("grpc.keepalive_permit_without_calls", 1),
            # (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS has this key)
            ("grpc.http2.min_ping_interval_without_data_ms", int(KEEPALIVE_S * 500)),
            ("grpc.http2.max_ping_strikes", 2),
            # The server's own pings find clients that vanished (a laptop put to sleep).
            ("grpc.keepalive_time_ms", int(KEEPALIVE_S * 3 * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000))]


def open_channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
                 ) -> grpc.Channel:
    """The one way to reach a worker: an insecure channel with our limits and keepalive."""
    return grpc.insecure_channel(address, options=client_options(max_message_bytes))


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class StreamClosedError(ConnectionError):
    """The peer ended a long-lived stream; the message says how."""


class ForwardStream:
    """A long-lived ``Forward`` call into one stage: messages are sent in ``send`` order.

    The orchestrator holds one into stage 0; every non-final stage holds one into the next.
    """

    def __init__(self, channel: grpc.Channel, token: str | None) -> None:
        self._queue: queue.SimpleQueue[pb.StageInput | None] = queue.SimpleQueue()
        stub = pb_grpc.WorkerStub(channel)
        self.call: grpc.Future = stub.Forward.future(self._requests(),
                                                     metadata=auth_metadata(token))

    def _requests(self) -> Iterator[pb.StageInput]:
        while (item := self._queue.get()) is not None:
            yield item

    def send(self, msg: pb.StageInput) -> None:
        if self.call.done():
            raise StreamClosedError(self.problem())
        self._queue.put(msg)

    @property
    def closed(self) -> bool:
        return self.call.done()

    def problem(self) -> str:
        """Why the stream ended, as text (empty while it is open)."""
        if not self.call.done():
            return ""
        try:
            exc = self.call.exception(timeout=0)
        except grpc.FutureCancelledError:
            return "the stream was cancelled"
        if isinstance(exc, grpc.RpcError):
            return f"{exc.code().name}: {exc.details()}"
        return repr(exc) if exc is not None else "the stream finished"

    def close(self) -> None:
        self._queue.put(None)


def measure_link(channel: grpc.Channel, token: str | None, payload_bytes: int,
                 deadline_s: float) -> tuple[float, float]:
    """(round-trip seconds, bytes per second) to the worker behind ``channel``: the best of
    three empty pings, then one ``payload_bytes`` ping."""
    stub = pb_grpc.WorkerStub(channel)
    metadata = auth_metadata(token)
    rtts = []
    for _ in range(3):
        started = time.perf_counter()
        stub.Ping(pb.PingRequest(), timeout=deadline_s, metadata=metadata)
        rtts.append(time.perf_counter() - started)
    rtt = min(rtts)
    started = time.perf_counter()
    stub.Ping(pb.PingRequest(payload=bytes(payload_bytes)), timeout=deadline_s,
              metadata=metadata)
    elapsed = max(time.perf_counter() - started - rtt, 1e-6)
    return rtt, payload_bytes / elapsed
