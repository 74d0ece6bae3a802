"""Failure behaviour of workers and the pipeline: each failure is a typed error naming the
worker and saying what to do; nothing hangs; nothing is left running."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from orchestrator.client import WorkerClient
from orchestrator.errors import (
    AuthError,
    InvalidInputError,
    MemoryBudgetError,
    MessageTooLargeError,
    ProtocolMismatchError,
    ShardHashError,
    WorkerUnreachableError,
)
from orchestrator.facts import read_model_facts
from orchestrator.pipeline import Pipeline, ShardStore, make_plan
from orchestrator.shard import LayerRange, write_shard
from orchestrator.wire import convert
from orchestrator.wire import worker_pb2 as pb
from orchestrator.wire import worker_pb2_grpc as pb_grpc
from worker.sampling import SamplingParams
from worker.service import serve
from worker.settings import WorkerSettings
from worker.stage import auth_metadata


@contextmanager
def worker_server(root: Path, **settings):
    """A real worker gRPC server on loopback, in a thread of this process."""
    ready = root / "ready"
    stop = threading.Event()
    config = WorkerSettings(host="127.0.0.1", port=0, cache_dir=root / "cache", ready_file=ready,
                            threads=1, **settings)
    thread = threading.Thread(target=serve, args=(config,), kwargs={"stop": stop}, daemon=True)
    thread.start()
    for _ in range(200):
        if ready.exists():
            break
        time.sleep(0.05)
    try:
        yield ready.read_text().strip()
    finally:
        stop.set()
        thread.join(timeout=20)


@pytest.fixture(scope="module")
def small_shard(smollm2_path, tmp_path_factory):
    return write_shard(smollm2_path, LayerRange(10, 20),
                       tmp_path_factory.mktemp("shard") / "mid.gguf")


def test_wrong_or_missing_token_is_rejected_and_nothing_happens(tmp_path, small_shard):
    with worker_server(tmp_path, token="right-token") as address:
        for token in (None, "wrong-token"):
            client = WorkerClient(address, token)
            with pytest.raises(AuthError, match=address):
                client.info()
            with pytest.raises(AuthError):
                client.upload_shard(small_shard.path, small_shard.sha256)
            with pytest.raises(AuthError):
                client.load_shard(pb.LoadShardRequest(sha256=small_shard.sha256))
            stub = pb_grpc.WorkerStub(client.channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Forward(iter([pb.StageInput(session="x")]), timeout=5,
                             metadata=auth_metadata(token))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            client.close()
        good = WorkerClient(address, "right-token")
        info = good.info()
        assert list(info.cached_shards) == [] and not info.HasField("loaded")
        good.close()


def test_protocol_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("worker.service.PROTOCOL_VERSION", 99)
    with worker_server(tmp_path) as address:
        client = WorkerClient(address, None)
        with pytest.raises(ProtocolMismatchError, match=rf"{re.escape(address)}.*protocol 99"):
            client.check_protocol()
        client.close()


def test_shard_hash_mismatch_is_refused_and_not_kept(tmp_path, small_shard):
    with worker_server(tmp_path) as address:
        client = WorkerClient(address, None)
        wrong = hashlib.sha256(b"something else").hexdigest()
        with pytest.raises(ShardHashError, match=address):
            client.upload_shard(small_shard.path, wrong)
        assert not list((tmp_path / "cache").glob("*.gguf"))
        assert not list((tmp_path / "cache").glob(".*part"))
        receipt = client.upload_shard(small_shard.path, small_shard.sha256)
        assert receipt.sha256 == small_shard.sha256 and not receipt.already_cached
        assert client.upload_shard(small_shard.path, small_shard.sha256).already_cached
        client.close()


def test_memory_budget_refuses_with_numbers(tmp_path, small_shard):
    with worker_server(tmp_path, memory_budget_mb=8) as address:
        client = WorkerClient(address, None)
        with pytest.raises(MemoryBudgetError, match=r"needs about \d+ MiB.*budget is 8 MiB"):
            client.upload_shard(small_shard.path, small_shard.sha256)
        client.close()


def test_unreachable_worker_is_named_quickly():
    client = WorkerClient("127.0.0.1:9", None)
    started = time.monotonic()
    with pytest.raises(WorkerUnreachableError, match=r"127\.0\.0\.1:9"):
        client.info(deadline=2.0)
    assert time.monotonic() - started < 5
    client.close()


@contextmanager
def two_stage_pipeline(smollm2_path, tmp_path, **settings):
    with worker_server(tmp_path / "a", **settings) as a, \
            worker_server(tmp_path / "b", **settings) as b:
        facts = read_model_facts(smollm2_path)
        plan = make_plan(facts, [a, b], context_tokens=1024, batch_tokens=512)
        pipeline = Pipeline(plan, facts, None)
        try:
            pipeline.deploy(ShardStore(tmp_path / "shards-out"))
            yield pipeline
        finally:
            pipeline.close()


def test_wrong_hidden_shape_is_a_clear_error(smollm2_path, tmp_path):
    with two_stage_pipeline(smollm2_path, tmp_path) as pipeline:
        last = pipeline.clients[1]
        bad = pb.StageInput(pipeline_id=pipeline.id, session="s", chunk=7, start_pos=0,
                            tokens=[1], want_token=True,
                            hidden=convert.hidden_to_proto(np.zeros((1, 100), np.float32), "f32"),
                            sampling=convert.sampling_to_proto(SamplingParams(temperature=0)))
        last.stub.Forward(iter([bad]), timeout=10)
        with pytest.raises(InvalidInputError, match=rf"{last.address}.*\(1, 100\).*576"):
            pipeline._wait("s", 7, deadline_s=10)


def test_oversized_message_is_a_clear_error(smollm2_path, tmp_path):
    with two_stage_pipeline(smollm2_path, tmp_path, max_message_mb=1) as pipeline:
        prompt = [1 + i % 1000 for i in range(500)]  # 500 x 576 f32 = 1.15 MB > 1 MiB
        with pytest.raises(MessageTooLargeError, match="q8_0"):
            list(pipeline.generate("s", prompt, SamplingParams(temperature=0), 2))


ORPHAN_SCRIPT = """
import sys, time
from pathlib import Path
from orchestrator.localcluster import LocalCluster
cluster = LocalCluster(2, Path(sys.argv[1]), threads_per_worker=1)
cluster.start()
print(" ".join(str(p.pid) for p in cluster.procs), flush=True)
time.sleep(600)
"""


def test_killed_orchestrator_leaves_no_workers(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    assert not any(_running(p) for p in pids)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
