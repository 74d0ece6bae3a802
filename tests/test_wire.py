"""The wire contract: generated code in sync with proto/, conversions, the status table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from orchestrator import errors
from orchestrator.codecs import CodecError
from orchestrator.wire import convert, status
from worker.sampling import SamplingParams

ROOT = Path(__file__).parent.parent


def test_committed_generated_code_matches_proto(tmp_path):
    subprocess.run(["bash", str(ROOT / "scripts/gen-proto.sh"), str(tmp_path)], check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    for name in ("worker_pb2.py", "worker_pb2.pyi", "worker_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (ROOT / "orchestrator/wire" / name).read_text(), \
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


@pytest.mark.parametrize(("exc", "code", "name"), [
    (errors.ContextFullError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, "context_full"),
    (errors.InvalidInputError("x"), grpc.StatusCode.INVALID_ARGUMENT, "invalid_input"),
    (CodecError("x"), grpc.StatusCode.INVALID_ARGUMENT, "codec"),
    (errors.ShardHashError("x"), grpc.StatusCode.DATA_LOSS, "shard_hash"),
    (errors.ComputeError("x"), grpc.StatusCode.INTERNAL, "compute"),
    (RuntimeError("x"), grpc.StatusCode.INTERNAL, "internal"),
])
def test_status_table(exc, code, name):
    assert status.to_status(exc) == code
    assert status.error_code(exc) == name
    back = status.from_code(name, "10.0.0.7:50151", "boom")
    assert "10.0.0.7:50151" in str(back) and "boom" in str(back)
    if name not in ("internal",):
        assert isinstance(back, (type(exc), errors.WorkerError))
