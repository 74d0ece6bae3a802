"""A worker under systemd (Type=notify), with a test socket in systemd's place: READY=1 only
once its port answers, STATUS= as its stage changes, WATCHDOG=1 at a third of the timeout
while its server answers itself, none while the server is wedged, STOPPING=1 at the end."""

from __future__ import annotations

import itertools
import statistics
import threading
import time

import pytest

from orchcore import modelgen
from orchcore.control import WorkerReport
from orchcore.notify import Notifier, socket_address, watchdog_timeout_s
from orchcore.wire import worker_pb2_grpc as pb_grpc
from orchcore.wire.channel import auth_metadata, connect
from orchestrator.cluster.client import WorkerClient
from orchestrator.cluster.local import LocalCluster
from orchestrator.settings import OrchSettings
from testkit.cluster import GREEDY, open_model
from testkit.models import generated_model
from testkit.notifysock import NotifySocket

TIMEOUT_S = 2.0  # WATCHDOG_USEC of these tests; the worker feeds it every third of that
RPC_THREADS = 32  # the worker's gRPC thread pool (worker/server.py)


def _info(address: str, token: str) -> WorkerReport:
    client = WorkerClient(address, token, OrchSettings.load())
    try:
        return client.info()
    finally:
        client.close()


@pytest.fixture
def notify(tmp_path, monkeypatch):
    with NotifySocket(tmp_path / "notify") as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", sock.env_value)  # the workers LocalCluster starts
        monkeypatch.setenv("WATCHDOG_USEC", str(int(TIMEOUT_S * 1e6)))
        yield sock


def test_ready_after_serving_then_status_and_watchdog(notify, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_WORKER_WATCHDOG_FLOOR_S", "1")  # a 2 s watchdog is allowed here
    other = generated_model(modelgen.preset("tiny-llama-gqa"), "tiny.gguf")
    with LocalCluster(1, tmp_path / "w", threads_per_worker=1) as workers:
        ready = notify.wait_for(lambda f: "READY" in f, 30)
        info = _info(workers.addresses[0], workers.token)  # serving when READY arrived
        assert notify.messages[0] is ready  # nothing before it
        assert ready.fields["READY"] == "1" and ready.fields["WATCHDOG"] == "1"
        assert "WATCHDOG_USEC" not in ready.fields  # 2 s is above the lowered floor
        assert ready.fields["STATUS"] == \
            f"worker {info.worker_id[:8]} on 127.0.0.1:{workers.addresses[0].split(':')[1]}: " \
            f"no layers loaded"

        pings = [m.at for m in notify.collect(3.5) if m.fields == {"WATCHDOG": "1"}]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert len(pings) >= 4, pings
        assert 0.5 < statistics.median(gaps) < 0.9 and max(gaps) < TIMEOUT_S, gaps

        with open_model(other, workers.addresses, workers.token, tmp_path / "o") as opened:
            loaded = notify.wait_for(lambda f: "layers [" in f.get("STATUS", ""), 10)
            assert "layers [0, 4) of tiny.gguf, 0 sessions" in loaded.fields["STATUS"]
            session = opened.new_session(GREEDY)
            tokens = opened.stream(session, [1, 2, 3], 4)
            next(tokens)  # the session lives until the iteration ends
            notify.wait_for(lambda f: "1 session" in f.get("STATUS", ""), 10)
            tokens.close()
        notify.wait_for(lambda f: f.get("STATUS", "").endswith("no layers loaded"), 10)
        workers.procs[0].terminate()
        notify.wait_for(lambda f: f.get("STOPPING") == "1", 10)
        assert workers.procs[0].wait(10) == 0


def test_no_watchdog_while_the_server_cannot_answer(notify, tmp_path, monkeypatch):
    """Every RPC thread held by a stream that sends nothing: the server is wedged, so the
    watchdog starves (systemd would restart it); released, the pings come back."""
    monkeypatch.setenv("ORCH_WORKER_WATCHDOG_FLOOR_S", "1")
    with LocalCluster(1, tmp_path / "w", threads_per_worker=1) as workers:
        notify.wait_for(lambda f: "READY" in f, 30)
        release = threading.Event()

        def silent():
            release.wait()
            yield from ()

        channel = connect(workers.addresses[0], workers.token, allow_plaintext=False,
                          timeout_s=10).require_proven(workers.token).channel
        forward = pb_grpc.WorkerStub(channel).Forward
        calls = [forward.future(silent(), metadata=auth_metadata(workers.token))
                 for _ in range(RPC_THREADS)]
        try:
            time.sleep(TIMEOUT_S / 3 + 0.5)  # a ping may be on its way as the pool fills
            starved = [m for m in notify.collect(2 * TIMEOUT_S) if "WATCHDOG" in m.fields]
        finally:
            release.set()
            for call in calls:
                call.result(timeout=10)
            channel.close()
        assert not starved
        notify.wait_for(lambda f: f == {"WATCHDOG": "1"}, TIMEOUT_S)
        log = (tmp_path / "w" / "logs" / "worker-0.log").read_text()
        assert "health check 1 failed: DEADLINE_EXCEEDED" in log


def test_a_short_watchdog_is_raised_to_the_floor(notify, tmp_path):
    with LocalCluster(1, tmp_path / "w", threads_per_worker=1):
        ready = notify.wait_for(lambda f: "READY" in f, 30)
        assert ready.fields["WATCHDOG_USEC"] == "30000000"  # the default floor, 30 s
        assert not [m for m in notify.collect(1.5) if "WATCHDOG" in m.fields]  # every 10 s


def test_without_a_notify_socket_nothing_is_sent(tmp_path):
    assert not Notifier.from_environ({}).enabled
    assert not Notifier.from_environ({}).send(READY=1)
    assert socket_address("@name") == "\0name" and socket_address("relative") is None
    with NotifySocket() as sock:  # the abstract namespace
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": sock.env_value})
        assert notifier.send(STATUS="two\nlines")
        assert sock.receive(5).fields == {"STATUS": "two lines"}
        notifier.close()


def test_watchdog_timeout_is_for_our_process_only():
    assert watchdog_timeout_s({"WATCHDOG_USEC": "2000000"}, 7) == 2.0
    assert watchdog_timeout_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"}, 7) == 2.0
    assert watchdog_timeout_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_timeout_s({"WATCHDOG_USEC": "0"}, 7) is None
    assert watchdog_timeout_s({}, 7) is None
