"""Failure behaviour of workers and the pipeline: each failure is a typed error naming the
worker and saying what to do; nothing hangs; nothing is left running."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager

import grpc
import numpy as np
import psutil
import pytest
from test_plan import device

from orchcore.chunks import ChunkError
from orchcore.config import EngineConfig
from orchcore.control import LoadedStage, LoadRequest, WorkerReport
from orchcore.errors import (
    AuthError,
    InvalidInputError,
    MemoryBudgetError,
    MessageTooLargeError,
    OrchError,
    ProtocolMismatchError,
    ShardHashError,
    StageFaultError,
    WorkerUnreachableError,
)
from orchcore.facts import read_model_facts
from orchcore.shard import LayerRange, write_shard
from orchcore.wire import convert, status
from orchcore.wire import worker_pb2 as pb
from orchcore.wire import worker_pb2_grpc as pb_grpc
from orchcore.wire.channel import StreamClosedError, auth_metadata, connect
from orchestrator.cluster.client import WorkerClient
from orchestrator.pipeline.datapath import DataPath
from orchestrator.planning.plan import PlanOptions, make_plan
from orchestrator.settings import OrchSettings
from testkit.cluster import GREEDY, greedy_tokens, open_model, worker_server
from testkit.waiting import wait_until

SETTINGS = OrchSettings.load()


def client_for(address: str, token: str | None = None) -> WorkerClient:
    return WorkerClient(address, token, SETTINGS)


def _load(sha256: str, start: int, end: int, **fields: object) -> LoadRequest:
    return LoadRequest(pipeline_id="p", sha256=sha256, layer_start=start, layer_end=end,
                       engine=EngineConfig(), **fields)


@pytest.fixture(scope="module")
def small_shard(smollm2_path, tmp_path_factory):
    return write_shard(smollm2_path, LayerRange(10, 20),
                       tmp_path_factory.mktemp("shard") / "mid.gguf")


def test_wrong_or_missing_token_is_rejected_and_nothing_happens(tmp_path, small_shard):
    with worker_server(tmp_path, token="right-token") as address:
        for token in (None, "wrong-token"):
            client = client_for(address, token)
            with pytest.raises(AuthError, match=address):
                client.info()
            with pytest.raises(AuthError):
                client.upload_shard(small_shard.path, small_shard.sha256)
            with pytest.raises(AuthError):
                client.load_shard(_load(small_shard.sha256, 0, 1))
            client.close()
            # The data path too; a wrong token is not even sent (the worker cannot prove it
            # holds it), so the stream below carries none or the wrong one by hand.
            link = connect(address, None, allow_plaintext=False, timeout_s=5)
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.WorkerStub(link.channel).Forward(
                    iter([pb.StageInput(session="x")]), timeout=5,
                    metadata=auth_metadata(token))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            link.close()
        good = client_for(address, "right-token")
        info = good.info()
        assert info.cached_shards == () and info.loaded is None, info
        good.close()


def test_protocol_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("worker.service.PROTOCOL_VERSION", 99)
    with worker_server(tmp_path) as address:
        client = client_for(address)
        with pytest.raises(ProtocolMismatchError, match=rf"{re.escape(address)}.*protocol 99"):
            client.check_protocol()
        client.close()


def test_shard_hash_mismatch_is_refused_and_not_kept(tmp_path, small_shard):
    with worker_server(tmp_path) as address:
        client = client_for(address)
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
    with worker_server(tmp_path, memory_budget_mb=64) as address:
        client = client_for(address)
        client.upload_shard(small_shard.path, small_shard.sha256)
        with pytest.raises(MemoryBudgetError, match=r"need \d+ MiB \(weights.*budget is 64 MiB"):
            client.load_shard(_load(small_shard.sha256, 10, 20, next_address="127.0.0.1:9"))
        assert str(client.info().memory_budget_bytes) == str(64 << 20)
        client.close()


def test_threads_are_bounded_by_the_cores(tmp_path, small_shard):
    with worker_server(tmp_path) as address:
        client = client_for(address)
        client.upload_shard(small_shard.path, small_shard.sha256)
        reply = client.stub.LoadShard(pb.LoadShardRequest(  # more threads than a client sends
            pipeline_id="p", sha256=small_shard.sha256, layer_start=10, layer_end=20,
            next_address="127.0.0.1:9", engine=pb.EngineSettings(threads=2**32 - 1)),
            metadata=client.metadata, timeout=60)
        assert 1 <= reply.engine.threads <= len(os.sched_getaffinity(0))
        client.close()


def test_unreachable_worker_is_named_quickly():
    client = client_for("127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(WorkerUnreachableError, match=r"127\.0\.0\.1:9"):
        client.info(deadline=2.0)
    assert time.monotonic() - started < 5
    client.close()


@contextmanager
def two_stage_model(smollm2_path, tmp_path, **settings):
    with worker_server(tmp_path / "a", **settings) as a, \
            worker_server(tmp_path / "b", **settings) as b, \
            open_model(smollm2_path, [a, b], None, tmp_path, context_tokens=1024,
                       batch_tokens=512) as model:
        yield model


def test_wrong_hidden_shape_is_a_clear_error(smollm2_path, tmp_path):
    with two_stage_model(smollm2_path, tmp_path) as model:
        last = model.path.clients[1]
        bad = pb.StageInput(pipeline_id=model.path.pipeline_id, session="s", chunk=7,
                            start_pos=0, tokens=[1], want_token=True,
                            hidden=convert.hidden_to_proto(np.zeros((1, 100), np.float32), "f32"),
                            sampling=convert.sampling_to_proto(GREEDY))
        model.path._queue("s")  # route the session's results here (``send`` would)
        last.stub.Forward(iter([bad]), timeout=10)
        with pytest.raises(InvalidInputError, match=rf"{last.address}.*\(1, 100\).*576") as info:
            model.path.wait("s", 7)
        assert str(info.value).count(last.address) == 1
        assert not status.retryable(info.value)


def test_oversized_message_is_a_clear_error(smollm2_path, tmp_path):
    with two_stage_model(smollm2_path, tmp_path, max_message_mb=1) as model:
        prompt = [1 + i % 1000 for i in range(500)]  # 500 x 576 f32 = 1.15 MB > 1 MiB
        with pytest.raises(MessageTooLargeError, match="q8_0"):
            greedy_tokens(model, prompt, 2)


def _fail(*_args, **_kwargs):
    raise RuntimeError("injected failure")


def _closed(*_args, **_kwargs):
    raise StreamClosedError("next stage 127.0.0.1:1 closed the stream: injected")


@pytest.mark.parametrize(("target", "replacement", "stage"), [
    ("worker.stage.Stage._publish", _fail, 1),  # the last stage cannot hand out a result
    ("worker.stage.DownstreamLink.send", _closed, 0),  # stage 0 cannot send on
])
def test_failure_after_compute_reaches_the_orchestrator_within_seconds(
        smollm2_path, tmp_path, monkeypatch, target, replacement, stage):
    with two_stage_model(smollm2_path, tmp_path) as model:
        assert greedy_tokens(model, [1, 2, 3], 2)  # the pipeline works
        monkeypatch.setattr(target, replacement)
        started = time.monotonic()
        with pytest.raises(StageFaultError) as info:
            greedy_tokens(model, [1, 2, 3], 2)
        assert time.monotonic() - started < 5  # not the step deadline (600 s)
        worker = model.plan.stages[stage].worker
        assert worker in str(info.value) and f"stage {stage}" in str(info.value)
        assert status.retryable(info.value)


ORPHAN_SCRIPT = """
import sys, time
from pathlib import Path
from orchestrator.cluster.local import LocalCluster
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
    wait_until(lambda: not any(_running(p) for p in pids), 15,
               f"the orphaned workers {pids} to exit")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_broken_shard_is_named_by_the_model_not_the_cache_path(tmp_path):
    junk = b"GGUF" + bytes(4000)  # stored fine (its hash is its hash), unusable as a model
    sha = hashlib.sha256(junk).hexdigest()
    with worker_server(tmp_path) as address:
        client = client_for(address)
        path = tmp_path / "junk.gguf"
        path.write_bytes(junk)
        client.upload_shard(path, sha)
        with pytest.raises(OrchError, match=r"the shard of layers \[0, 4\) of mine\.gguf") as info:
            client.load_shard(_load(sha, 0, 4, model="mine.gguf"))
        assert str(tmp_path / "cache") not in str(info.value)
        assert str(info.value).count(address) == 1
        client.close()


class _ProbedWorker:
    """A worker as the probe sees it: its Info answer, or the error reaching it raises."""

    def __init__(self, address: str, pipeline_id: str, fault: str | None = None,
                 gone: bool = False) -> None:
        self.address, self.pipeline_id, self.fault, self.gone = address, pipeline_id, fault, gone

    def info(self, deadline: float | None = None) -> WorkerReport:
        if self.gone:
            raise WorkerUnreachableError(self.address, "connection refused")
        fault = None if self.fault is None else ChunkError(
            status.error_code(StageFaultError("x")), self.fault, self.address)
        loaded = LoadedStage(sha256="", layer_start=0, layer_end=1, source_layers=2,
                             pipeline_id=self.pipeline_id, resident_bytes=0, fault=fault)
        return WorkerReport(
            protocol_version=0, worker_id="", hostname="", software_version="",
            ram_total_bytes=0, ram_available_bytes=0, memory_budget_bytes=0, cores=1,
            cpu_model="", cpu_flags=(), arch="", cached_shards=(), loaded=loaded, host_id="",
            cache_used_bytes=0, cache_free_bytes=0, cache_max_bytes=0, threads=1)


def test_a_dead_later_stage_is_blamed_not_the_stage_that_could_not_reach_it(smollm2_path):
    """Stage 0 reports "next stage closed the stream" when stage 1 dies; the probe must
    name stage 1 (the one to leave out), not the healthy stage 0."""
    plan = make_plan(read_model_facts(smollm2_path), [device(1), device(2)],
                     PlanOptions(use_all=True))
    first, last = (s.worker for s in plan.stages)
    path = DataPath(plan, "p1", [
        _ProbedWorker(first, "p1", fault=f"next stage {last} closed the stream"),
        _ProbedWorker(last, "p1", gone=True)], None, SETTINGS)
    with pytest.raises(WorkerUnreachableError) as raised:
        path.probe()
    assert raised.value.worker == last and path.failed == {last}

    faulty = DataPath(plan, "p1", [_ProbedWorker(first, "p1", fault="bug"),
                                   _ProbedWorker(last, "p1")], None, SETTINGS)
    with pytest.raises(StageFaultError, match=r"bug.*stage 0") as raised:
        faulty.probe()
    assert raised.value.worker == first and not faulty.failed
