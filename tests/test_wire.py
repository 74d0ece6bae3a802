"""The wire contract: generated code in sync with proto/, conversions, the status table."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from orchcore import errors
from orchcore.codecs import CodecError
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
                   want_token=True, drafted=3, draft_k=3, ring_left=10)
    back = convert.chunk_from_proto(convert.chunk_to_proto(verify), "w")
    assert back == verify and back.drafts == (5, 6, 7) and back.verifies
    verdict = StageResult(session="s", chunk=4, token=8, drafts=(5, 6, 7), accepted=2)
    back = convert.result_from_proto(convert.result_to_proto(verdict))
    assert back == verdict and back.tokens == (5, 6, 8)


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
