"""The one place that converts protobuf messages to Python values and back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from orchcore.chunks import Chunk, ChunkError, Rows, StageResult, StageTiming
from orchcore.codecs import get_codec
from orchcore.config import EngineConfig
from orchcore.control import Holder, LoadReply, LoadRequest
from orchcore.devices import DeviceFacts
from orchcore.errors import InvalidInputError, OrchError
from orchcore.rangefetch import RemoteFile
from orchcore.sampling import SamplingParams, TokenLogprobs
from orchcore.shard import LayerRange
from orchcore.slices import ByteRange
from orchcore.wire import status
from orchcore.wire import worker_pb2 as pb


def hidden_to_proto(x: np.ndarray, codec: str) -> pb.Hidden:
    rows, cols = x.shape
    return pb.Hidden(codec=codec, rows=rows, cols=cols, data=get_codec(codec).encode(x))


def hidden_from_proto(msg: pb.Hidden) -> np.ndarray:
    return get_codec(msg.codec).decode(msg.data, msg.rows, msg.cols)


def rows_to_proto(rows: Rows) -> pb.Hidden:
    return pb.Hidden(codec=rows.codec, rows=rows.rows, cols=rows.cols, data=rows.data)


def rows_from_proto(msg: pb.Hidden) -> Rows:
    return Rows(msg.codec, msg.rows, msg.cols, msg.data)


def sampling_to_proto(params: SamplingParams) -> pb.Sampling:
    return pb.Sampling(
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        repeat_penalty=params.repeat_penalty,
        repeat_last_n=params.repeat_last_n,
        seed=params.seed,
        grammar=params.grammar,
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
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
        grammar=msg.grammar,
        logprobs=msg.logprobs,
        top_logprobs=int(msg.top_logprobs),
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


# --- the data path -------------------------------------------------------------------------


def timing_to_proto(t: StageTiming) -> pb.StageTiming:
    return pb.StageTiming(stage_index=t.stage_index, compute_ms=t.compute_ms,
                          queue_ms=t.queue_ms, sent_bytes=t.sent_bytes, send_ms=t.send_ms)


def timing_from_proto(msg: pb.StageTiming) -> StageTiming:
    return StageTiming(msg.stage_index, msg.compute_ms, msg.queue_ms, msg.sent_bytes,
                       msg.send_ms)


def error_to_proto(error: ChunkError) -> pb.Error:
    return pb.Error(code=error.code, message=error.message, worker=error.worker)


def error_from_proto(msg: pb.Error) -> ChunkError:
    return ChunkError(msg.code, msg.message, msg.worker)


def chunk_to_proto(chunk: Chunk) -> pb.StageInput:
    msg = pb.StageInput(
        pipeline_id=chunk.pipeline_id, session=chunk.session, chunk=chunk.chunk,
        start_pos=chunk.start_pos, tokens=chunk.tokens, want_token=chunk.want_token,
        end_session=chunk.end_session, timings=[timing_to_proto(t) for t in chunk.timings],
        batched=[chunk_to_proto(b) for b in chunk.batched], ring_left=chunk.ring_left,
        ring_stops=chunk.ring_stops)
    if chunk.hidden is not None:
        msg.hidden.CopyFrom(rows_to_proto(chunk.hidden))
    if chunk.sampling is not None:
        msg.sampling.CopyFrom(sampling_to_proto(chunk.sampling))
    if chunk.error is not None:
        msg.error.CopyFrom(error_to_proto(chunk.error))
    return msg


def chunk_from_proto(msg: pb.StageInput, worker: str) -> Chunk:
    """The chunk ``msg`` carries. Sampling parameters out of bounds make it a chunk that
    carries the error, named for ``worker`` (this one): it fails in order down the path
    like any chunk, instead of breaking the stream it came on."""
    error = error_from_proto(msg.error) if msg.HasField("error") else None
    sampling = None
    if msg.HasField("sampling") and error is None:
        try:
            sampling = sampling_from_proto(msg.sampling)
        except (OrchError, ValueError) as exc:
            error = ChunkError(status.error_code(exc), str(exc), worker)
    return Chunk(
        pipeline_id=msg.pipeline_id, session=msg.session, chunk=msg.chunk,
        start_pos=msg.start_pos, tokens=tuple(msg.tokens),
        hidden=rows_from_proto(msg.hidden) if msg.HasField("hidden") and error is None
        else None,
        want_token=msg.want_token, sampling=sampling, end_session=msg.end_session,
        timings=tuple(timing_from_proto(t) for t in msg.timings), error=error,
        batched=tuple(chunk_from_proto(b, worker) for b in msg.batched),
        ring_left=msg.ring_left, ring_stops=tuple(msg.ring_stops))


def chunk_size(chunk: Chunk) -> int:
    """Bytes ``chunk`` takes on the wire."""
    return chunk_to_proto(chunk).ByteSize()


def result_to_proto(result: StageResult) -> pb.StageOutput:
    msg = pb.StageOutput(session=result.session, chunk=result.chunk, token=result.token,
                         timings=[timing_to_proto(t) for t in result.timings],
                         session_ended=result.session_ended, batch=result.batch)
    if result.error is not None:
        msg.error.CopyFrom(error_to_proto(result.error))
    if result.logprobs is not None:
        msg.logprob = result.logprobs.logprob
        msg.top_logprobs.extend(pb.TokenLogprob(token=t, logprob=p)
                                for t, p in result.logprobs.top)
    return msg


def result_from_proto(msg: pb.StageOutput) -> StageResult:
    return StageResult(
        session=msg.session, chunk=msg.chunk, token=msg.token,
        timings=tuple(timing_from_proto(t) for t in msg.timings),
        error=error_from_proto(msg.error) if msg.HasField("error") else None,
        session_ended=msg.session_ended, batch=tuple(msg.batch),
        logprobs=TokenLogprobs(msg.logprob, tuple((t.token, t.logprob) for t in
                                                  msg.top_logprobs))
        if msg.HasField("logprob") else None)


# --- the control path ----------------------------------------------------------------------


def load_to_proto(request: LoadRequest) -> pb.LoadShardRequest:
    return pb.LoadShardRequest(
        pipeline_id=request.pipeline_id, sha256=request.sha256,
        layer_start=request.layer_start, layer_end=request.layer_end,
        engine=engine_to_proto(request.engine), next_address=request.next_address,
        codec=request.codec, stage_index=request.stage_index,
        stage_count=request.stage_count, holder=request.holder, model=request.model,
        force=request.force, ring_address=request.ring_address)


def load_from_proto(msg: pb.LoadShardRequest, default_threads: int, max_threads: int
                    ) -> LoadRequest:
    """The request, its engine settings resolved as ``engine_from_proto`` does."""
    return LoadRequest(
        pipeline_id=msg.pipeline_id, sha256=msg.sha256, layer_start=msg.layer_start,
        layer_end=msg.layer_end,
        engine=engine_from_proto(msg.engine, default_threads, max_threads),
        next_address=msg.next_address, codec=msg.codec or "f32",
        stage_index=msg.stage_index, stage_count=msg.stage_count, holder=msg.holder,
        model=msg.model, force=msg.force, ring_address=msg.ring_address)


def holders_to_proto(holders: Sequence[Holder]) -> list[pb.Holder]:
    return [pb.Holder(id=h.id, since=h.since, expires_in_s=h.expires_in_s) for h in holders]


def load_reply_to_proto(reply: LoadReply) -> pb.LoadShardReply:
    return pb.LoadShardReply(resident_bytes=reply.resident_bytes,
                             load_seconds=reply.load_seconds,
                             engine=engine_to_proto(reply.engine),
                             pipeline_id=reply.pipeline_id, shared=reply.shared)


def load_reply_from_proto(msg: pb.LoadShardReply) -> LoadReply:
    engine = EngineConfig(context_tokens=msg.engine.context_tokens,
                          max_sessions=msg.engine.max_sessions,
                          batch_tokens=msg.engine.batch_tokens, threads=msg.engine.threads)
    return LoadReply(msg.resident_bytes, msg.load_seconds, engine, msg.pipeline_id,
                     msg.shared)
