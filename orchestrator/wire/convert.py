"""The one place that converts protobuf messages to Python values and back."""

from __future__ import annotations

import numpy as np

from orchestrator.codecs import get_codec
from orchestrator.wire import worker_pb2 as pb
from worker.sampling import SamplingParams


def hidden_to_proto(x: np.ndarray, codec: str) -> pb.Hidden:
    rows, cols = x.shape
    return pb.Hidden(codec=codec, rows=rows, cols=cols, data=get_codec(codec).encode(x))


def hidden_from_proto(msg: pb.Hidden) -> np.ndarray:
    return get_codec(msg.codec).decode(msg.data, msg.rows, msg.cols)


def sampling_to_proto(params: SamplingParams) -> pb.Sampling:
    return pb.Sampling(
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        repeat_penalty=params.repeat_penalty,
        repeat_last_n=params.repeat_last_n,
        seed=params.seed,
    )


def sampling_from_proto(msg: pb.Sampling) -> SamplingParams:
    # float32 on the wire: round to what a user could have typed, so validation bounds hold
    return SamplingParams(
        temperature=round(float(msg.temperature), 6),
        top_k=int(msg.top_k),
        top_p=min(1.0, round(float(msg.top_p), 6)),
        min_p=round(float(msg.min_p), 6),
        repeat_penalty=round(float(msg.repeat_penalty), 6),
        repeat_last_n=int(msg.repeat_last_n),
        seed=int(msg.seed),
    )
