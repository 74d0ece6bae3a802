"""Channels and streams, the same for the orchestrator and for worker-to-worker links.

``connect`` is the one way to reach a worker: TLS pinned to the certificate the worker
proved it holds the token over (``orchcore.wire.tls``), or plaintext on loopback or when
allowed explicitly.

Keepalive: clients ping an idle connection every ``KEEPALIVE_S`` so a dead peer is
noticed; servers accept pings that often (``server_options``). The two must agree: a
server's default minimum is 5 minutes, and a client pinging more often than that gets a
GOAWAY "too_many_pings" after two strikes, which killed idle chats after ~45 s.
"""

from __future__ import annotations

import enum
import hmac
import queue
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from orchcore.chunks import Chunk
from orchcore.control import Proof
from orchcore.discovery import proof
from orchcore.errors import AuthError, WorkerError, WorkerUnreachableError
from orchcore.wire import convert, tls
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


def open_channel(address: str, certificate: bytes | None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.Channel:
    """A channel with our limits and keepalive: TLS accepting ``certificate`` and no other,
    or plaintext when it is None. Use ``connect``, which pins only a proven certificate."""
    options = client_options(max_message_bytes)
    if certificate is None:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate)
    return grpc.secure_channel(address, credentials,
                               options=[*options, ("grpc.ssl_target_name_override",
                                                   tls.SERVER_NAME)])


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class Trust(enum.Enum):
    """What a worker's ``Prove`` answer showed about the token it holds."""

    PROVEN = "holds our token"  # over this link's certificate
    NO_TOKEN = "holds no token"
    OTHER = "holds another token"  # or one, when we hold none


@dataclass
class Link:
    """A channel to one worker and what is known of it."""

    address: str
    channel: grpc.Channel
    fingerprint: str  # hex SHA-256 of the pinned certificate; "" for plaintext
    trust: Trust
    worker_id: str

    def require_proven(self, token: str | None) -> Link:
        """This link, if the token may be sent over it; else ``AuthError`` saying why."""
        if token and self.trust is not Trust.PROVEN:
            self.channel.close()
            where = f"its certificate {tls.short(self.fingerprint)}" if self.fingerprint \
                else "a plaintext link"
            raise AuthError(self.address, f"{self.trust.value}: it could not prove over "
                                          f"{where} that it holds the cluster token, so the "
                                          f"token was not sent. Another cluster's worker, "
                                          f"or a machine in between; check ORCH_TOKEN")
        return self

    def close(self) -> None:
        self.channel.close()


def connect(address: str, token: str | None, *, allow_plaintext: bool, timeout_s: float,
            max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Link:
    """Reach the worker at ``address``: read its certificate, pin it, ask for the proof.

    Plaintext is accepted from loopback addresses, or anywhere with ``allow_plaintext``.
    Raises ``WorkerUnreachableError``, or ``AuthError`` for plaintext not allowed; the
    caller judges ``Link.trust`` (``require_proven`` before sending the token)."""
    try:
        certificate = tls.fetch_certificate(address, timeout_s)
    except (OSError, ValueError) as exc:
        raise WorkerUnreachableError(address, f"unreachable ({exc}); is `orch worker` "
                                              f"running there and the port open?") from None
    if certificate is None and not (allow_plaintext or tls.is_loopback(address)):
        raise AuthError(address, "answers without TLS (an orch older than this one, or "
                                 "started with ORCH_WORKER_PLAINTEXT). Upgrade it, or allow "
                                 "plaintext here with ORCH_PLAINTEXT=1 on a network you trust")
    fingerprint = tls.fingerprint(certificate) if certificate else ""
    channel = open_channel(address, certificate, max_message_bytes)
    nonce = secrets.token_bytes(32)
    try:
        reply = convert.proof_from_proto(pb_grpc.WorkerStub(channel).Prove(
            convert.prove_to_proto(nonce), timeout=timeout_s))
    except grpc.RpcError as exc:
        channel.close()
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise WorkerUnreachableError(address, f"does not answer ({exc.code().name}: "
                                                  f"{exc.details()})") from None
        raise WorkerError(address, f"{exc.code().name}: {exc.details()}") from None
    return Link(address, channel, fingerprint, _trust(token, nonce, fingerprint, reply),
                reply.worker_id)


def _trust(token: str | None, nonce: bytes, fingerprint: str, reply: Proof) -> Trust:
    if not reply.proof:
        return Trust.NO_TOKEN
    if not token:
        return Trust.OTHER
    expected = proof(token, nonce, b"worker", fingerprint)
    answers = [a for a in (reply.proof, reply.previous_proof) if a]
    return Trust.PROVEN if any(hmac.compare_digest(a, expected) for a in answers) \
        else Trust.OTHER


class StreamClosedError(ConnectionError):
    """The peer ended a long-lived stream; the message says how."""


class ForwardStream:
    """A long-lived ``Forward`` call into one stage: chunks are sent in ``send`` order.

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

    def send(self, chunk: Chunk) -> None:
        if self.call.done():
            raise StreamClosedError(self.problem())
        self._queue.put(convert.chunk_to_proto(chunk))

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


def ping(channel: grpc.Channel, token: str | None, deadline_s: float, *,
         wait_for_ready: bool = False) -> None:
    """One empty ``Ping`` to the worker behind ``channel``; raises ``grpc.RpcError`` when it
    does not answer within ``deadline_s``."""
    pb_grpc.WorkerStub(channel).Ping(pb.PingRequest(), timeout=deadline_s,
                                     metadata=auth_metadata(token), wait_for_ready=wait_for_ready)


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
