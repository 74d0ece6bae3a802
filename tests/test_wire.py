"""The wire contract: generated code in sync with proto/, conversions, the status table."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from orchcore import errors
from orchcore.codecs import CodecError
from orchcore.errors import InvalidInputError
from orchcore.sampling import SamplingParams
from orchcore.wire import channel, convert, status
from orchcore.wire import worker_pb2 as pb
from orchcore.wire import worker_pb2_grpc as pb_grpc

ROOT = Path(__file__).parent.parent


def test_committed_generated_code_matches_proto(tmp_path):
    subprocess.run(["bash", str(ROOT / "scripts/gen-proto.sh"), str(tmp_path)], check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    for name in ("worker_pb2.py", "worker_pb2.pyi", "worker_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (ROOT / "orchcore/wire" / name).read_text(), \
            f"{name} is stale: run scripts/gen-proto.sh"


@pytest.mark.parametrize("codec", ["f32", "f16", "q8_0"])
def test_hidden_round_trip(codec):
    x = np.random.default_rng(0).normal(size=(3, 576)).astype(np.float32)
    y = convert.hidden_from_proto(convert.hidden_to_proto(x, codec))
    assert y.shape == x.shape and y.dtype == np.float32
    if codec == "f32":
        assert np.array_equal(x, y)
    else:
        assert np.abs(x - y).max() < 0.05


def test_sampling_round_trip():
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.1,
                            repeat_penalty=1.1, repeat_last_n=32, seed=1234)
    assert convert.sampling_from_proto(convert.sampling_to_proto(params)) == params


@pytest.mark.parametrize(("exc", "code", "name", "retryable"), [
    (errors.ContextFullError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, "context_full", False),
    (errors.InvalidInputError("x"), grpc.StatusCode.INVALID_ARGUMENT, "invalid_input", False),
    (CodecError("x"), grpc.StatusCode.INVALID_ARGUMENT, "codec", False),
    (errors.ShardHashError("x"), grpc.StatusCode.DATA_LOSS, "shard_hash", True),
    (errors.ComputeError("x"), grpc.StatusCode.INTERNAL, "compute", True),
    (errors.NotLoadedError("x"), grpc.StatusCode.FAILED_PRECONDITION, "not_loaded", True),
    (errors.StageFaultError("x"), grpc.StatusCode.INTERNAL, "stage_fault", True),
    (errors.InvalidSettingError("x"), grpc.StatusCode.INVALID_ARGUMENT, "invalid_setting",
     False),
    (errors.UnsupportedModelError("m.gguf", "x"), grpc.StatusCode.INVALID_ARGUMENT,
     "unsupported_model", False),
    (errors.WorkerUnreachableError("w", "x"), grpc.StatusCode.UNAVAILABLE, "unreachable", True),
    (errors.AuthError("w", "x"), grpc.StatusCode.UNAUTHENTICATED, "auth", False),
    (RuntimeError("x"), grpc.StatusCode.INTERNAL, "internal", True),
])
def test_status_table(exc, code, name, retryable):
    assert status.to_status(exc) == code
    assert status.error_code(exc) == name
    assert status.retryable(exc) is retryable
    back = status.from_code(name, "10.0.0.7:50151", "boom")
    assert str(back).count("10.0.0.7:50151") == 1 and "boom" in str(back)
    assert back.worker == "10.0.0.7:50151"
    assert status.retryable(back) is retryable
    if name != "internal":
        assert type(back) is type(exc)


class _Slow(pb_grpc.WorkerServicer):
    """Results: one message, then a second once ``go`` is set (a stream left idle)."""

    def __init__(self) -> None:
        self.go = threading.Event()

    def Results(self, request, context):
        yield pb.StageOutput(session="a")
        self.go.wait(30)
        yield pb.StageOutput(session="b")


def _idle_stream(server_options: list, idle_s: float) -> str:
    """A real server and client on loopback; a results stream idles, then carries on."""
    servicer = _Slow()
    server = grpc.server(futures.ThreadPoolExecutor(4), options=server_options)
    pb_grpc.add_WorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    chan = channel.open_channel(f"127.0.0.1:{port}", None)
    try:
        results = pb_grpc.WorkerStub(chan).Results(pb.ResultsRequest(), timeout=30)
        assert next(results).session == "a"
        time.sleep(idle_s)
        servicer.go.set()
        return next(results).session
    finally:
        servicer.go.set()
        chan.close()
        server.stop(0)


def test_keepalive_policies_agree(monkeypatch):
    """A stream left idle survives: the server accepts the client's keepalive pings. With
    gRPC's default server policy the same client is sent away ("too_many_pings"), which is
    how an idle chat used to die after ~45 s (here the interval is 1/20 of the real one)."""
    monkeypatch.setattr(channel, "KEEPALIVE_S", 1.0)
    assert _idle_stream(channel.server_options(), 5.0) == "b"
    with pytest.raises(grpc.RpcError) as info:
        _idle_stream([], 5.0)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_chunk_and_a_result_round_trip_through_their_messages():
    from orchcore.chunks import Chunk, ChunkError, Rows, StageResult, StageTiming

    rows = Rows.encode(np.ones((2, 8), np.float32), "q8_0")
    chunk = Chunk(pipeline_id="p", session="s", chunk=3, start_pos=4, tokens=(1, 2),
                  hidden=rows, want_token=True, sampling=SamplingParams(seed=7),
                  timings=(StageTiming(0, 1.5, 0.25, 99, 0.5),), ring_left=2,
                  ring_stops=(0,), batched=(Chunk(pipeline_id="p", session="t", tokens=(9,)),))
    assert convert.chunk_from_proto(convert.chunk_to_proto(chunk), "w") == chunk
    result = StageResult(session="s", chunk=3, token=5, timings=chunk.timings,
                         error=ChunkError("compute", "x", "w"), batch=(3, 4))
    assert convert.result_from_proto(convert.result_to_proto(result)) == result
    verify = Chunk(pipeline_id="p", session="s", start_pos=9, tokens=(4, 5, 6, 7),
                   want_token=True, drafted=3, draft_k=3, ring_left=10, draft_ahead=True,
                   ahead=True)
    back = convert.chunk_from_proto(convert.chunk_to_proto(verify), "w")
    assert back == verify and back.drafts == (5, 6, 7) and back.verifies
    verdict = StageResult(session="s", chunk=4, token=8, drafts=(5, 6, 7), accepted=2,
                          ahead=True)
    back = convert.result_from_proto(convert.result_to_proto(verdict))
    assert back == verdict and back.tokens == (5, 6, 8)


def test_embedding_rows_travel_with_a_chunk_into_stage_0_and_no_further():
    from orchcore.chunks import Chunk, EmbeddedRows, Rows

    rows = EmbeddedRows(8, 34, bytes(range(68)))  # two Q8_0 rows of 32 values
    step = Chunk(pipeline_id="p", session="t", tokens=(9,), rows=EmbeddedRows(8, 34, b"x" * 34))
    chunk = Chunk(pipeline_id="p", session="s", tokens=(1, 2), rows=rows, batched=(step,))
    back = convert.chunk_from_proto(convert.chunk_to_proto(chunk), "w")
    assert back == chunk and back.rows.count == 2
    assert back.embedded() == EmbeddedRows(8, 34, bytes(range(68)) + b"x" * 34)
    sent_on = back.without_rows()
    assert sent_on.rows is None and sent_on.batched[0].rows is None
    assert convert.chunk_size(sent_on) < convert.chunk_size(back) - 100
    on = replace(sent_on, hidden=Rows.encode(np.ones((3, 4), np.float32), "f32"))
    assert convert.chunk_from_proto(convert.chunk_to_proto(on), "w").rows is None
    with pytest.raises(InvalidInputError, match="every token needs its embedding row"):
        replace(chunk, batched=(replace(step, rows=None),)).embedded()


@pytest.mark.parametrize(("tokens", "want_token"), [([4, 5], True), ([4], True),
                                                     ([4, 5, 6], False)])
def test_a_verification_chunk_without_a_pending_token_or_a_verdict_carries_the_error(
        tokens, want_token):
    msg = pb.StageInput(pipeline_id="p", session="s", tokens=tokens, want_token=want_token,
                        drafted=2)
    chunk = convert.chunk_from_proto(msg, "worker:1")
    assert chunk.error is not None and chunk.error.code == "invalid_input", chunk
    assert "pending token, then its drafts" in chunk.error.message and not chunk.drafted


def test_a_chunk_with_sampling_out_of_bounds_carries_the_error_and_no_rows():
    msg = pb.StageInput(pipeline_id="p", session="s", tokens=[1], sampling=pb.Sampling(
        top_k=-1), hidden=convert.hidden_to_proto(np.ones((1, 4), np.float32), "f32"))
    chunk = convert.chunk_from_proto(msg, "worker:1")
    assert chunk.error is not None and chunk.error.worker == "worker:1", chunk
    assert chunk.error.code == "invalid_setting" and "top_k" in chunk.error.message
    assert chunk.hidden is None and chunk.sampling is None


def _report(loaded):
    from orchcore.control import WorkerReport

    return WorkerReport(
        protocol_version=5, worker_id="w1", hostname="pi-1", software_version="1.2.3",
        ram_total_bytes=8 << 30, ram_available_bytes=6 << 30, memory_budget_bytes=4 << 30,
        cores=4, cpu_model="Cortex-A76", cpu_flags=("asimd", "asimddp"), arch="aarch64",
        cached_shards=("a" * 64, "b" * 64), loaded=loaded, host_id="h1",
        cache_used_bytes=1 << 20, cache_free_bytes=2 << 20, cache_max_bytes=3 << 20, threads=4)


def test_a_worker_report_round_trips_with_and_without_a_stage():
    from orchcore.chunks import ChunkError
    from orchcore.control import Holder, LoadedStage

    stage = LoadedStage(sha256="c" * 64, layer_start=10, layer_end=20, source_layers=30,
                        pipeline_id="p", resident_bytes=123, model="m.gguf", sessions=2,
                        fault=ChunkError("stage_fault", "next stage gone", "w:1"),
                        holders=(Holder("o1", 1.5, 20.0), Holder("o2", 2.5, 10.0)))
    for report in (_report(None), _report(stage)):
        back = convert.report_from_proto(convert.report_to_proto(report))
        assert back == report, f"{back} != {report}"
    assert str(stage.layers) == "[10, 20)"


def test_a_report_gives_the_planner_its_device():
    from dataclasses import replace

    device = _report(None).device("10.0.0.7:50151")
    assert (device.address, device.worker_id, device.host_id, device.cores, device.threads) \
        == ("10.0.0.7:50151", "w1", "h1", 4, 4)
    odd = replace(_report(None), host_id="", cores=0, threads=8).device("a:1")
    assert (odd.host_id, odd.cores, odd.threads) == ("w1", 1, 1), odd  # never 0 cores


def test_control_replies_and_requests_round_trip():
    from orchcore.control import (
        FetchProgress,
        Lease,
        LinkMeasurement,
        ProbeResult,
        Proof,
        ShardReceipt,
    )
    from orchcore.probe import LayerShape

    receipt = ShardReceipt("d" * 64, 99, already_cached=True)
    assert convert.receipt_from_proto(convert.receipt_to_proto(receipt)) == receipt
    for progress in (FetchProgress(5, 10), FetchProgress(10, 10, receipt)):
        assert convert.progress_from_proto(convert.progress_to_proto(progress)) == progress
    probed = ProbeResult(0.002, 0.0005, cached=True)
    assert convert.probe_result_from_proto(convert.probe_result_to_proto(probed)) == probed
    for link in (LinkMeasurement(0.001, 1e8), LinkMeasurement(error="refused")):
        assert convert.link_from_proto(convert.link_to_proto(link)) == link
    lease = Lease("p", "o1")
    assert convert.lease_from_proto(convert.renew_to_proto(lease)) == lease
    assert convert.lease_from_proto(convert.unload_to_proto(lease)) == lease
    proof = Proof(b"x" * 32, b"", "w1")
    assert convert.proof_from_proto(convert.proof_to_proto(proof)) == proof
    shape = LayerShape("llama", 576, 1536, 9, 3, 2, 1 << 20)
    assert convert.shape_from_proto(convert.probe_to_proto(shape)) == shape
    assert convert.measure_link_from_proto(convert.measure_link_to_proto("a:1", 4096)) \
        == ("a:1", 4096)
    header, *data = convert.upload_to_proto("e" * 64, 6, [b"abc", b"def"])
    assert (header.sha256, header.size, [m.data for m in data]) == ("e" * 64, 6,
                                                                      [b"abc", b"def"])
