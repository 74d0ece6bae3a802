"""The one place that converts protobuf messages to Python values and back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from orchcore.codecs import get_codec
from orchcore.config import EngineConfig
from orchcore.devices import DeviceFacts
from orchcore.errors import InvalidInputError
from orchcore.rangefetch import RemoteFile
from orchcore.sampling import SamplingParams
from orchcore.shard import LayerRange
from orchcore.slices import ByteRange
from orchcore.wire import worker_pb2 as pb


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


def device_from_proto(address: str, info: pb.WorkerInfo) -> DeviceFacts:
    return DeviceFacts(
        address=address, worker_id=info.worker_id,
        host_id=info.host_id or info.worker_id,  # unknown host: assume a machine of its own
        hostname=info.hostname, arch=info.arch, cores=max(1, info.cores),
        ram_total_bytes=info.ram_total_bytes, ram_available_bytes=info.ram_available_bytes,
        memory_budget_bytes=info.memory_budget_bytes,
        threads=min(info.threads, max(1, info.cores)))


def engine_to_proto(config: EngineConfig) -> pb.EngineSettings:
    return pb.EngineSettings(context_tokens=config.context_tokens,
                             max_sessions=config.max_sessions,
                             batch_tokens=config.batch_tokens, threads=config.threads)


def engine_from_proto(msg: pb.EngineSettings, default_threads: int, max_threads: int
                      ) -> EngineConfig:
    """Unset (0) fields keep the engine's defaults; threads default to the worker's own and
    never exceed ``max_threads`` (more threads than cores only slow llama.cpp down)."""
    default = EngineConfig()
    return EngineConfig(context_tokens=msg.context_tokens or default.context_tokens,
                        max_sessions=msg.max_sessions or default.max_sessions,
                        batch_tokens=msg.batch_tokens or default.batch_tokens,
                        threads=min(msg.threads or default_threads, max_threads))


def fetch_to_proto(files: Sequence[RemoteFile], ranges: Sequence[ByteRange],
                   layers: LayerRange) -> pb.FetchShardRequest:
    return pb.FetchShardRequest(
        files=[pb.SourceFile(url=f.url, size=f.size, etag=f.etag, name=f.filename)
               for f in files],
        ranges=[pb.ByteRange(part=r.part, offset=r.offset, length=r.length) for r in ranges],
        layer_start=layers.start, layer_end=layers.end)


MAX_SOURCE_FILE_BYTES = 1 << 42  # 4 TiB: well past any model's file, far below the OS's limits


def fetch_from_proto(msg: pb.FetchShardRequest
                     ) -> tuple[tuple[RemoteFile, ...], tuple[ByteRange, ...], LayerRange]:
    files = tuple(RemoteFile(f.url, f.size, f.etag, f.name) for f in msg.files)
    if not files or any(not f.url.startswith(("http://", "https://")) for f in files):
        raise InvalidInputError("FetchShard: give the model's files as http(s) URLs")
    if any(f.size > MAX_SOURCE_FILE_BYTES for f in files):
        raise InvalidInputError(f"FetchShard: a file of more than "
                                f"{MAX_SOURCE_FILE_BYTES >> 40} TiB is not a model")
    if any(f.filename in ("", ".", "..") or "/" in f.filename or "\0" in f.filename
           for f in files):
        raise InvalidInputError("FetchShard: a file name must be a plain name, not a path")
    ranges = tuple(ByteRange(r.part, r.offset, r.length) for r in msg.ranges)
    if any(r.part >= len(files) or r.end > files[r.part].size for r in ranges):
        raise InvalidInputError("FetchShard: a byte range lies outside its file")
    return files, ranges, LayerRange(msg.layer_start, msg.layer_end)
