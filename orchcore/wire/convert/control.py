"""The control path's messages: loading a stage, what a worker is and holds, shards and
slices into its cache, leases, probes, links and tokens."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict

from orchcore.config import EngineConfig
from orchcore.control import (
    FetchProgress,
    Holder,
    Lease,
    LinkMeasurement,
    LoadedStage,
    LoadReply,
    LoadRequest,
    ProbeResult,
    Proof,
    ShardReceipt,
    ShardUpload,
    SliceUpload,
    WorkerReport,
)
from orchcore.errors import InvalidInputError
from orchcore.probe import LayerShape
from orchcore.rangefetch import RemoteFile
from orchcore.shard import LayerRange
from orchcore.slices import ByteRange
from orchcore.wire import worker_pb2 as pb
from orchcore.wire.convert.data import (
    engine_from_proto,
    engine_to_proto,
    error_from_proto,
    error_to_proto,
)


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


# --- a slice sent by the orchestrator (UploadShard, FindShard) ----------------------------


def slice_to_proto(files: Sequence[RemoteFile], ranges: Sequence[ByteRange],
                   layers: LayerRange) -> pb.ShardSlice:
    return pb.ShardSlice(
        files=[pb.SourceFile(size=f.size, etag=f.etag, name=f.filename) for f in files],
        ranges=[pb.ByteRange(part=r.part, offset=r.offset, length=r.length) for r in ranges],
        layer_start=layers.start, layer_end=layers.end)


def slice_from_proto(msg: pb.ShardSlice
                     ) -> tuple[tuple[RemoteFile, ...], tuple[ByteRange, ...], LayerRange]:
    """The files (no URL: their bytes come in the upload), ranges and layers of a slice."""
    files = tuple(RemoteFile("", f.size, f.etag, f.name) for f in msg.files)
    if not files or any(not f.name or not f.etag for f in files):
        raise InvalidInputError("a shard slice names each file of the model, with its "
                                "identity")
    if any(f.size > MAX_SOURCE_FILE_BYTES for f in files):
        raise InvalidInputError(f"a shard slice: a file of more than "
                                f"{MAX_SOURCE_FILE_BYTES >> 40} TiB is not a model")
    if any(f.name in (".", "..") or "/" in f.name or "\0" in f.name for f in files):
        raise InvalidInputError("a shard slice: a file name must be a plain name, not a path")
    ranges = tuple(ByteRange(r.part, r.offset, r.length) for r in msg.ranges)
    if any(r.part >= len(files) or r.end > files[r.part].size for r in ranges):
        raise InvalidInputError("a shard slice: a byte range lies outside its file")
    if sum(r.length for r in ranges) > sum(f.size for f in files):
        raise InvalidInputError("a shard slice: its ranges hold more bytes than its files")
    return files, ranges, LayerRange(msg.layer_start, msg.layer_end)


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


def load_reply_to_proto(reply: LoadReply) -> pb.LoadShardReply:
    return pb.LoadShardReply(resident_bytes=reply.resident_bytes,
                             load_seconds=reply.load_seconds,
                             engine=engine_to_proto(reply.engine),
                             pipeline_id=reply.pipeline_id, shared=reply.shared)


def load_reply_from_proto(msg: pb.LoadShardReply) -> LoadReply:
    engine = EngineConfig(context_tokens=msg.engine.context_tokens,
                          max_sessions=msg.engine.max_sessions,
                          batch_tokens=msg.engine.batch_tokens, threads=msg.engine.threads,
                          output_rows=msg.engine.output_rows or EngineConfig().output_rows)
    return LoadReply(msg.resident_bytes, msg.load_seconds, engine, msg.pipeline_id,
                     msg.shared)


# --- the control path: what a worker is and holds -------------------------------------------


def info_to_proto() -> pb.InfoRequest:
    return pb.InfoRequest()


def report_to_proto(report: WorkerReport) -> pb.WorkerInfo:
    fields = {k: v for k, v in asdict(report).items() if k != "loaded"}
    msg = pb.WorkerInfo(**fields)
    if report.loaded is not None:
        msg.loaded.CopyFrom(loaded_to_proto(report.loaded))
    return msg


def report_from_proto(msg: pb.WorkerInfo) -> WorkerReport:
    return WorkerReport(
        protocol_version=msg.protocol_version, worker_id=msg.worker_id,
        hostname=msg.hostname, software_version=msg.software_version,
        ram_total_bytes=msg.ram_total_bytes, ram_available_bytes=msg.ram_available_bytes,
        memory_budget_bytes=msg.memory_budget_bytes, cores=msg.cores,
        cpu_model=msg.cpu_model, cpu_flags=tuple(msg.cpu_flags), arch=msg.arch,
        cached_shards=tuple(msg.cached_shards),
        loaded=loaded_from_proto(msg.loaded) if msg.HasField("loaded") else None,
        host_id=msg.host_id, cache_used_bytes=msg.cache_used_bytes,
        cache_free_bytes=msg.cache_free_bytes, cache_max_bytes=msg.cache_max_bytes,
        threads=msg.threads, baseline_bytes=msg.baseline_bytes)


def loaded_to_proto(stage: LoadedStage) -> pb.LoadedShard:
    msg = pb.LoadedShard(
        sha256=stage.sha256, layer_start=stage.layer_start, layer_end=stage.layer_end,
        source_layers=stage.source_layers, pipeline_id=stage.pipeline_id,
        resident_bytes=stage.resident_bytes, model=stage.model, sessions=stage.sessions,
        holders=[pb.Holder(id=h.id, since=h.since, expires_in_s=h.expires_in_s)
                 for h in stage.holders])
    if stage.fault is not None:
        msg.fault.CopyFrom(error_to_proto(stage.fault))
    return msg


def loaded_from_proto(msg: pb.LoadedShard) -> LoadedStage:
    return LoadedStage(
        sha256=msg.sha256, layer_start=msg.layer_start, layer_end=msg.layer_end,
        source_layers=msg.source_layers, pipeline_id=msg.pipeline_id,
        resident_bytes=msg.resident_bytes,
        fault=error_from_proto(msg.fault) if msg.HasField("fault") else None,
        holders=tuple(Holder(h.id, h.since, h.expires_in_s) for h in msg.holders),
        model=msg.model, sessions=msg.sessions)


# --- the control path: shards into the cache -----------------------------------------------


def upload_to_proto(sha256: str, size: int, blocks: Iterable[bytes]
                    ) -> Iterator[pb.ShardChunk]:
    """An UploadShard stream: the header, then ``blocks`` of the shard's bytes."""
    yield pb.ShardChunk(sha256=sha256, size=size)
    for data in blocks:
        yield pb.ShardChunk(data=data)


def slice_upload_to_proto(files: Sequence[RemoteFile], ranges: Sequence[ByteRange],
                          layers: LayerRange, size: int, blocks: Iterable[bytes]
                          ) -> Iterator[pb.ShardChunk]:
    """An UploadShard stream of a slice: the header names it, then ``blocks`` of the bytes
    of its ranges, in order; the worker cuts the shard."""
    yield pb.ShardChunk(slice=slice_to_proto(files, ranges, layers), size=size)
    for data in blocks:
        yield pb.ShardChunk(data=data)


def upload_from_proto(stream: Iterator[pb.ShardChunk]) -> ShardUpload | SliceUpload:
    """An UploadShard stream as what it uploads: its first message names a shard (sha256,
    size) or a slice; the bytes follow, the first message's included."""
    header = next(stream, None)
    if header is None or not (header.sha256 or header.HasField("slice")):
        raise InvalidInputError("UploadShard: the first message must name sha256 and size, "
                                "or a slice")
    data = (c.data for c in itertools.chain([header], stream) if c.data)
    if not header.HasField("slice"):
        return ShardUpload(header.sha256, header.size, data)
    files, ranges, layers = slice_from_proto(header.slice)
    if header.size != sum(r.length for r in ranges):
        raise InvalidInputError(f"UploadShard: the slice's ranges hold "
                                f"{sum(r.length for r in ranges)} bytes, not the announced "
                                f"{header.size}")
    return SliceUpload(files, ranges, layers, header.size, data)


def receipt_to_proto(receipt: ShardReceipt) -> pb.ShardReceipt:
    return pb.ShardReceipt(**receipt._asdict())


def receipt_from_proto(msg: pb.ShardReceipt) -> ShardReceipt:
    return ShardReceipt(msg.sha256, msg.size, msg.already_cached)


def progress_to_proto(progress: FetchProgress) -> pb.FetchProgress:
    msg = pb.FetchProgress(done=progress.done, total=progress.total)
    if progress.shard is not None:
        msg.shard.CopyFrom(receipt_to_proto(progress.shard))
    return msg


def progress_from_proto(msg: pb.FetchProgress) -> FetchProgress:
    return FetchProgress(msg.done, msg.total,
                         receipt_from_proto(msg.shard) if msg.HasField("shard") else None)


# --- the control path: leases, probes, links, tokens ---------------------------------------


def renew_to_proto(lease: Lease) -> pb.RenewRequest:
    return pb.RenewRequest(pipeline_id=lease.pipeline_id, holder=lease.holder)


def unload_to_proto(lease: Lease) -> pb.UnloadRequest:
    return pb.UnloadRequest(pipeline_id=lease.pipeline_id, holder=lease.holder)


def lease_from_proto(msg: pb.RenewRequest | pb.UnloadRequest) -> Lease:
    return Lease(msg.pipeline_id, msg.holder)


def renewed_to_proto(held: bool) -> pb.RenewReply:
    return pb.RenewReply(held=held)


def renewed_from_proto(msg: pb.RenewReply) -> bool:
    """Whether the lease is still held (False: the pipeline is gone or the lease lapsed)."""
    return msg.held


def unloaded_to_proto(was_loaded: bool) -> pb.UnloadReply:
    return pb.UnloadReply(was_loaded=was_loaded)


def unloaded_from_proto(msg: pb.UnloadReply) -> bool:
    return msg.was_loaded


def probe_to_proto(shape: LayerShape) -> pb.ProbeRequest:
    return pb.ProbeRequest(**asdict(shape))


def shape_from_proto(msg: pb.ProbeRequest) -> LayerShape:
    return LayerShape(arch=msg.arch, n_embd=msg.n_embd, n_ff=msg.n_ff, n_head=msg.n_head,
                      n_head_kv=msg.n_head_kv, weight_type=msg.weight_type,
                      layer_bytes=msg.layer_bytes)


def probe_result_to_proto(result: ProbeResult) -> pb.ProbeReply:
    return pb.ProbeReply(**result._asdict())


def probe_result_from_proto(msg: pb.ProbeReply) -> ProbeResult:
    return ProbeResult(msg.decode_s_per_layer, msg.prefill_s_per_token_per_layer, msg.cached)


def measure_link_to_proto(address: str, payload_bytes: int) -> pb.MeasureLinkRequest:
    return pb.MeasureLinkRequest(address=address, payload_bytes=payload_bytes)


def measure_link_from_proto(msg: pb.MeasureLinkRequest) -> tuple[str, int]:
    """(the other worker's address, the payload asked for; 0 if none)."""
    return msg.address, msg.payload_bytes


def link_to_proto(measured: LinkMeasurement) -> pb.LinkMeasure:
    return pb.LinkMeasure(**measured._asdict())


def link_from_proto(msg: pb.LinkMeasure) -> LinkMeasurement:
    return LinkMeasurement(msg.rtt_s, msg.bandwidth_bytes_s, msg.error)


def ping_from_proto(msg: pb.PingRequest) -> int:
    """The bytes of payload a Ping carried."""
    return len(msg.payload)


def ping_reply_to_proto(received: int) -> pb.PingReply:
    return pb.PingReply(received=received)


def prove_to_proto(nonce: bytes) -> pb.ProveRequest:
    return pb.ProveRequest(nonce=nonce)


def nonce_from_proto(msg: pb.ProveRequest) -> bytes:
    return msg.nonce


def proof_to_proto(proof: Proof) -> pb.ProveReply:
    return pb.ProveReply(**proof._asdict())


def proof_from_proto(msg: pb.ProveReply) -> Proof:
    return Proof(msg.proof, msg.previous_proof, msg.worker_id)


def rotate_to_proto(new_token: str) -> pb.RotateTokenRequest:
    return pb.RotateTokenRequest(new_token=new_token)


def rotate_from_proto(msg: pb.RotateTokenRequest) -> str:
    return msg.new_token


def grace_to_proto(grace_s: float) -> pb.RotateTokenReply:
    return pb.RotateTokenReply(grace_s=grace_s)


def grace_from_proto(msg: pb.RotateTokenReply) -> float:
    """Seconds the previous token still works."""
    return msg.grace_s
