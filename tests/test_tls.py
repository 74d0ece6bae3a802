"""TLS on the worker port: a pinned, proven certificate or nothing; the token never in
the clear. Real workers, real sockets on loopback, and a real relay that records bytes."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from orchcore.errors import AuthError
from orchcore.wire import tls
from orchcore.wire import worker_pb2 as pb
from orchcore.wire import worker_pb2_grpc as pb_grpc
from orchcore.wire.channel import Trust, auth_metadata, connect, open_channel
from orchestrator.cluster.client import WorkerClient
from orchestrator.settings import OrchSettings
from testkit.cluster import greedy_tokens, open_model, worker_server

TOKEN = "tls-test-token-0123456789"


class Relay:
    """A TCP relay on loopback that keeps every byte it passes, both ways."""

    def __init__(self, target: str) -> None:
        self.target = tls.host_port(target)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                with self._lock:
                    self.seen += data
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


@contextlib.contextmanager
def relays(targets: list[str]) -> Iterator[list[Relay]]:
    made = [Relay(t) for t in targets]
    try:
        yield made
    finally:
        for relay in made:
            relay.close()


def test_a_generation_over_tls_never_shows_the_token_on_the_wire(smollm2_path, tmp_path):
    """Orchestrator -> worker and worker -> worker both pass the relays (the orchestrator
    knows the workers by the relays' addresses, and gives those as next stages)."""
    with worker_server(tmp_path / "a", token=TOKEN) as a, \
            worker_server(tmp_path / "b", token=TOKEN) as b, relays([a, b]) as (ra, rb):
        with open_model(smollm2_path, [ra.address, rb.address], TOKEN, tmp_path) as model:
            tokens = greedy_tokens(model, [1, 2, 3, 4], 4)
        assert len(tokens) == 4
        for relay in (ra, rb):
            assert len(relay.seen) > 100_000  # the shard and hidden states went through
            assert TOKEN.encode() not in relay.seen
            assert b"\x16\x03" in relay.seen[:8]  # a TLS handshake record opened it


def test_the_same_capture_shows_the_token_when_plaintext(tmp_path):
    """The check above can fail: without TLS, the relay sees the token."""
    with worker_server(tmp_path, token=TOKEN, plaintext=True) as address, \
            relays([address]) as (relay,):
        client = WorkerClient(relay.address, TOKEN, OrchSettings())
        assert client.link.fingerprint == "" and client.link.trust is Trust.PROVEN
        client.info()
        client.close()
        assert TOKEN.encode() in relay.seen


def test_a_channel_pinned_to_another_certificate_is_refused(tmp_path):
    with worker_server(tmp_path, token=TOKEN) as address:
        other = tls.make_identity()
        channel = open_channel(address, other.cert_pem)
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.WorkerStub(channel).Ping(pb.PingRequest(), timeout=5,
                                             metadata=auth_metadata(TOKEN))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
        # The worker's own certificate, as connect pins it, works.
        link = connect(address, TOKEN, allow_plaintext=False, timeout_s=5)
        assert link.trust is Trust.PROVEN
        assert link.fingerprint == tls.load_identity(tmp_path / "cache").fingerprint
        link.close()


class _Impostor(pb_grpc.WorkerServicer):
    """A worker of its own certificate, without the token, that relays Prove to the real
    worker (the best answer it can get) and records what it is sent."""

    def __init__(self, real: str) -> None:
        self.real = real
        self.metadata: list[tuple[str, str]] = []

    def Prove(self, request, context):
        self.metadata += context.invocation_metadata()
        link = connect(self.real, None, allow_plaintext=False, timeout_s=5)
        try:
            return pb_grpc.WorkerStub(link.channel).Prove(request, timeout=5)
        finally:
            link.close()

    def Info(self, request, context):
        self.metadata += context.invocation_metadata()
        return pb.WorkerInfo()


def test_an_impostor_relaying_the_proof_gets_neither_token_nor_traffic(tmp_path):
    with worker_server(tmp_path, token=TOKEN) as real:
        impostor = _Impostor(real)
        identity = tls.make_identity()
        server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_WorkerServicer_to_server(impostor, server)
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            [(identity.key_pem, identity.cert_pem)]))
        server.start()
        try:
            client = WorkerClient(f"127.0.0.1:{port}", TOKEN, OrchSettings())
            with pytest.raises(AuthError, match="could not prove"):
                client.info()
            client.close()
            link = connect(f"127.0.0.1:{port}", TOKEN, allow_plaintext=False, timeout_s=5)
            assert link.trust is Trust.OTHER and link.fingerprint == identity.fingerprint
            link.close()
        finally:
            server.stop(0)
        assert all(key != "authorization" for key, _ in impostor.metadata)
        assert not any(TOKEN in value for _, value in impostor.metadata)


def test_plaintext_is_refused_beyond_loopback_unless_allowed(tmp_path, monkeypatch):
    with worker_server(tmp_path, token=TOKEN, plaintext=True) as address:
        # As the address of another machine would be judged:
        monkeypatch.setattr(tls, "is_loopback", lambda _address: False)
        with pytest.raises(AuthError, match="without TLS"):
            connect(address, TOKEN, allow_plaintext=False, timeout_s=5)
        client = WorkerClient(address, TOKEN, OrchSettings(plaintext=True))
        assert client.info().worker_id
        client.close()


def test_a_worker_keeps_its_certificate_across_restarts(tmp_path):
    fingerprints = []
    for run in range(2):
        with worker_server(tmp_path / str(run), token=TOKEN,
                           state_dir=tmp_path / "state") as address:
            link = connect(address, TOKEN, allow_plaintext=False, timeout_s=5)
            fingerprints.append(link.fingerprint)
            link.close()
    assert fingerprints[0] == fingerprints[1] != ""
    assert (tmp_path / "state" / tls.IDENTITY_FILE).stat().st_mode & 0o777 == 0o600


def test_after_a_rotation_the_old_token_still_proves_during_the_grace(tmp_path):
    new = "the-new-token-abcdefghijkl"
    with worker_server(tmp_path, token=TOKEN) as address:
        client = WorkerClient(address, TOKEN, OrchSettings())
        client.rotate_token(new)
        client.close()
        for token in (TOKEN, new):
            link = connect(address, token, allow_plaintext=False, timeout_s=5)
            assert link.trust is Trust.PROVEN, token
            link.close()
        link = connect(address, "a-third-token-abcdefghij", allow_plaintext=False,
                       timeout_s=5)
        assert link.trust is Trust.OTHER
        link.close()
