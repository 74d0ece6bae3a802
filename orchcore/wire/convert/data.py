"""The data path's messages: hidden-state rows, sampling and engine settings, chunks going
down the stages and results coming back."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from orchcore.chunks import (
    Chunk,
    ChunkError,
    EmbeddedRows,
    Rows,
    RowScore,
    StageResult,
    StageTiming,
)
from orchcore.codecs import get_codec
from orchcore.config import EngineConfig
from orchcore.errors import InvalidInputError, OrchError
from orchcore.sampling import SamplingParams, TokenLogprobs
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


def engine_to_proto(config: EngineConfig) -> pb.EngineSettings:
    return pb.EngineSettings(context_tokens=config.context_tokens,
                             max_sessions=config.max_sessions,
                             batch_tokens=config.batch_tokens, threads=config.threads,
                             output_rows=config.output_rows)


def engine_from_proto(msg: pb.EngineSettings, default_threads: int, max_threads: int
                      ) -> EngineConfig:
    """Unset (0) fields keep the engine's defaults; threads default to the worker's own and
    never exceed ``max_threads`` (more threads than cores only slow llama.cpp down)."""
    default = EngineConfig()
    return EngineConfig(context_tokens=msg.context_tokens or default.context_tokens,
                        max_sessions=msg.max_sessions or default.max_sessions,
                        batch_tokens=msg.batch_tokens or default.batch_tokens,
                        threads=min(msg.threads or default_threads, max_threads),
                        output_rows=msg.output_rows or default.output_rows)


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
        ring_stops=chunk.ring_stops, drafted=chunk.drafted, draft_k=chunk.draft_k,
        draft_ahead=chunk.draft_ahead, ahead=chunk.ahead, score_rows=chunk.score_rows,
        copy_to=chunk.copy_to, embed=chunk.embed)
    if chunk.next_token is not None:
        msg.next_token = chunk.next_token
    if chunk.hidden is not None:
        msg.hidden.CopyFrom(rows_to_proto(chunk.hidden))
    if chunk.sampling is not None:
        msg.sampling.CopyFrom(sampling_to_proto(chunk.sampling))
    if chunk.error is not None:
        msg.error.CopyFrom(error_to_proto(chunk.error))
    if chunk.rows is not None:  # stage 0 of a tied split: the tokens' embedding rows
        msg.rows.CopyFrom(pb.EmbeddedRows(ggml_type=chunk.rows.ggml_type,
                                          row_bytes=chunk.rows.row_bytes,
                                          data=chunk.rows.data))
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
    if error is None and msg.drafted and (msg.drafted >= len(msg.tokens) or not msg.want_token):
        error = ChunkError(status.error_code(InvalidInputError()),
                           f"a verification chunk carries the pending token, then its drafts, "
                           f"and asks for a token; got {len(msg.tokens)} tokens with "
                           f"{msg.drafted} drafted", worker)
    return Chunk(
        pipeline_id=msg.pipeline_id, session=msg.session, chunk=msg.chunk,
        start_pos=msg.start_pos, tokens=tuple(msg.tokens),
        hidden=rows_from_proto(msg.hidden) if msg.HasField("hidden") and error is None
        else None,
        want_token=msg.want_token, sampling=sampling, end_session=msg.end_session,
        timings=tuple(timing_from_proto(t) for t in msg.timings), error=error,
        batched=tuple(chunk_from_proto(b, worker) for b in msg.batched),
        ring_left=msg.ring_left, ring_stops=tuple(msg.ring_stops),
        drafted=msg.drafted if error is None else 0, draft_k=msg.draft_k,
        draft_ahead=msg.draft_ahead, ahead=msg.ahead,
        score_rows=msg.score_rows,
        next_token=msg.next_token if msg.HasField("next_token") else None,
        copy_to=tuple(msg.copy_to), embed=msg.embed,
        rows=EmbeddedRows(msg.rows.ggml_type, msg.rows.row_bytes, msg.rows.data)
        if msg.HasField("rows") and error is None else None)


def chunk_size(chunk: Chunk) -> int:
    """Bytes ``chunk`` takes on the wire."""
    return chunk_to_proto(chunk).ByteSize()


def result_to_proto(result: StageResult) -> pb.StageOutput:
    msg = pb.StageOutput(session=result.session, chunk=result.chunk, token=result.token,
                         timings=[timing_to_proto(t) for t in result.timings],
                         session_ended=result.session_ended, batch=result.batch,
                         drafts=result.drafts, accepted=result.accepted,
                         ahead=result.ahead)
    if result.error is not None:
        msg.error.CopyFrom(error_to_proto(result.error))
    if result.logprobs is not None:
        msg.logprob = result.logprobs.logprob
        msg.top_logprobs.extend(pb.TokenLogprob(token=t, logprob=p)
                                for t, p in result.logprobs.top)
    for score in result.row_scores:
        row = msg.row_scores.add(top=[pb.TokenLogprob(token=t, logprob=p) for t, p in score.top])
        if score.logprob is not None:
            row.logprob = score.logprob
    if result.embedding is not None:
        msg.embedding.CopyFrom(rows_to_proto(result.embedding))
    return msg


def result_from_proto(msg: pb.StageOutput) -> StageResult:
    return StageResult(
        session=msg.session, chunk=msg.chunk, token=msg.token,
        timings=tuple(timing_from_proto(t) for t in msg.timings),
        error=error_from_proto(msg.error) if msg.HasField("error") else None,
        session_ended=msg.session_ended, batch=tuple(msg.batch), drafts=tuple(msg.drafts),
        accepted=msg.accepted, ahead=msg.ahead,
        logprobs=TokenLogprobs(msg.logprob, tuple((t.token, t.logprob) for t in
                                                  msg.top_logprobs))
        if msg.HasField("logprob") else None,
        row_scores=tuple(RowScore(r.logprob if r.HasField("logprob") else None,
                                  tuple((t.token, t.logprob) for t in r.top))
                         for r in msg.row_scores),
        embedding=rows_from_proto(msg.embedding) if msg.HasField("embedding") else None)


# --- the data path's own calls -------------------------------------------------------------


def subscribe_to_proto(pipeline_id: str) -> pb.ResultsRequest:
    return pb.ResultsRequest(pipeline_id=pipeline_id)


def subscribe_from_proto(msg: pb.ResultsRequest) -> str:
    """The pipeline whose results are asked for."""
    return msg.pipeline_id


def chunks_from_proto(messages: Iterable[pb.StageInput], worker: str) -> Iterator[Chunk]:
    """A Forward stream's chunks (``chunk_from_proto``, as ``worker``)."""
    for msg in messages:
        yield chunk_from_proto(msg, worker)


def forwarded_to_proto(chunks: int) -> pb.ForwardSummary:
    return pb.ForwardSummary(chunks=chunks)


def end_session_from_proto(msg: pb.EndSessionRequest) -> str:
    return msg.session


def session_ended_to_proto(existed: bool) -> pb.EndSessionReply:
    return pb.EndSessionReply(existed=existed)
