from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RotateTokenRequest(_message.Message):
    __slots__ = ("new_token",)
    NEW_TOKEN_FIELD_NUMBER: _ClassVar[int]
    new_token: str
    def __init__(self, new_token: _Optional[str] = ...) -> None: ...

class RotateTokenReply(_message.Message):
    __slots__ = ("grace_s",)
    GRACE_S_FIELD_NUMBER: _ClassVar[int]
    grace_s: float
    def __init__(self, grace_s: _Optional[float] = ...) -> None: ...

class SourceFile(_message.Message):
    __slots__ = ("url", "size", "etag", "name")
    URL_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    url: str
    size: int
    etag: str
    name: str
    def __init__(self, url: _Optional[str] = ..., size: _Optional[int] = ..., etag: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ByteRange(_message.Message):
    __slots__ = ("part", "offset", "length")
    PART_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    part: int
    offset: int
    length: int
    def __init__(self, part: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class FetchShardRequest(_message.Message):
    __slots__ = ("files", "ranges", "layer_start", "layer_end")
    FILES_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[SourceFile]
    ranges: _containers.RepeatedCompositeFieldContainer[ByteRange]
    layer_start: int
    layer_end: int
    def __init__(self, files: _Optional[_Iterable[_Union[SourceFile, _Mapping]]] = ..., ranges: _Optional[_Iterable[_Union[ByteRange, _Mapping]]] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class FetchProgress(_message.Message):
    __slots__ = ("done", "total", "shard")
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    done: int
    total: int
    shard: ShardReceipt
    def __init__(self, done: _Optional[int] = ..., total: _Optional[int] = ..., shard: _Optional[_Union[ShardReceipt, _Mapping]] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("arch", "n_embd", "n_ff", "n_head", "n_head_kv", "weight_type", "layer_bytes")
    ARCH_FIELD_NUMBER: _ClassVar[int]
    N_EMBD_FIELD_NUMBER: _ClassVar[int]
    N_FF_FIELD_NUMBER: _ClassVar[int]
    N_HEAD_FIELD_NUMBER: _ClassVar[int]
    N_HEAD_KV_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_TYPE_FIELD_NUMBER: _ClassVar[int]
    LAYER_BYTES_FIELD_NUMBER: _ClassVar[int]
    arch: str
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    weight_type: int
    layer_bytes: int
    def __init__(self, arch: _Optional[str] = ..., n_embd: _Optional[int] = ..., n_ff: _Optional[int] = ..., n_head: _Optional[int] = ..., n_head_kv: _Optional[int] = ..., weight_type: _Optional[int] = ..., layer_bytes: _Optional[int] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("decode_s_per_layer", "prefill_s_per_token_per_layer", "cached")
    DECODE_S_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_PER_TOKEN_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    decode_s_per_layer: float
    prefill_s_per_token_per_layer: float
    cached: bool
    def __init__(self, decode_s_per_layer: _Optional[float] = ..., prefill_s_per_token_per_layer: _Optional[float] = ..., cached: _Optional[bool] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("received",)
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    received: int
    def __init__(self, received: _Optional[int] = ...) -> None: ...

class MeasureLinkRequest(_message.Message):
    __slots__ = ("address", "payload_bytes")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    address: str
    payload_bytes: int
    def __init__(self, address: _Optional[str] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class LinkMeasure(_message.Message):
    __slots__ = ("rtt_s", "bandwidth_bytes_s", "error")
    RTT_S_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    rtt_s: float
    bandwidth_bytes_s: float
    error: str
    def __init__(self, rtt_s: _Optional[float] = ..., bandwidth_bytes_s: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("pipeline_id", "holder")
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    pipeline_id: str
    holder: str
    def __init__(self, pipeline_id: _Optional[str] = ..., holder: _Optional[str] = ...) -> None: ...

class RenewReply(_message.Message):
    __slots__ = ("held",)
    HELD_FIELD_NUMBER: _ClassVar[int]
    held: bool
    def __init__(self, held: _Optional[bool] = ...) -> None: ...

class Holder(_message.Message):
    __slots__ = ("id", "since", "expires_in_s")
    ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    id: str
    since: float
    expires_in_s: float
    def __init__(self, id: _Optional[str] = ..., since: _Optional[float] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

class ProveRequest(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class ProveReply(_message.Message):
    __slots__ = ("proof", "worker_id", "previous_proof")
    PROOF_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_PROOF_FIELD_NUMBER: _ClassVar[int]
    proof: bytes
    worker_id: str
    previous_proof: bytes
    def __init__(self, proof: _Optional[bytes] = ..., worker_id: _Optional[str] = ..., previous_proof: _Optional[bytes] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("protocol_version", "worker_id", "hostname", "software_version", "ram_total_bytes", "ram_available_bytes", "memory_budget_bytes", "cores", "cpu_model", "cpu_flags", "arch", "cached_shards", "loaded", "host_id", "cache_used_bytes", "cache_free_bytes", "cache_max_bytes", "threads", "baseline_bytes")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    RAM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RAM_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    CORES_FIELD_NUMBER: _ClassVar[int]
    CPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    CPU_FLAGS_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    CACHED_SHARDS_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_BYTES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    worker_id: str
    hostname: str
    software_version: str
    ram_total_bytes: int
    ram_available_bytes: int
    memory_budget_bytes: int
    cores: int
    cpu_model: str
    cpu_flags: _containers.RepeatedScalarFieldContainer[str]
    arch: str
    cached_shards: _containers.RepeatedScalarFieldContainer[str]
    loaded: LoadedShard
    host_id: str
    cache_used_bytes: int
    cache_free_bytes: int
    cache_max_bytes: int
    threads: int
    baseline_bytes: int
    def __init__(self, protocol_version: _Optional[int] = ..., worker_id: _Optional[str] = ..., hostname: _Optional[str] = ..., software_version: _Optional[str] = ..., ram_total_bytes: _Optional[int] = ..., ram_available_bytes: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., cores: _Optional[int] = ..., cpu_model: _Optional[str] = ..., cpu_flags: _Optional[_Iterable[str]] = ..., arch: _Optional[str] = ..., cached_shards: _Optional[_Iterable[str]] = ..., loaded: _Optional[_Union[LoadedShard, _Mapping]] = ..., host_id: _Optional[str] = ..., cache_used_bytes: _Optional[int] = ..., cache_free_bytes: _Optional[int] = ..., cache_max_bytes: _Optional[int] = ..., threads: _Optional[int] = ..., baseline_bytes: _Optional[int] = ...) -> None: ...

class LoadedShard(_message.Message):
    __slots__ = ("sha256", "layer_start", "layer_end", "source_layers", "pipeline_id", "resident_bytes", "fault", "holders", "model", "sessions")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    FAULT_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    layer_start: int
    layer_end: int
    source_layers: int
    pipeline_id: str
    resident_bytes: int
    fault: Error
    holders: _containers.RepeatedCompositeFieldContainer[Holder]
    model: str
    sessions: int
    def __init__(self, sha256: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., source_layers: _Optional[int] = ..., pipeline_id: _Optional[str] = ..., resident_bytes: _Optional[int] = ..., fault: _Optional[_Union[Error, _Mapping]] = ..., holders: _Optional[_Iterable[_Union[Holder, _Mapping]]] = ..., model: _Optional[str] = ..., sessions: _Optional[int] = ...) -> None: ...

class ShardChunk(_message.Message):
    __slots__ = ("sha256", "size", "data", "slice")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    data: bytes
    slice: ShardSlice
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ..., data: _Optional[bytes] = ..., slice: _Optional[_Union[ShardSlice, _Mapping]] = ...) -> None: ...

class ShardSlice(_message.Message):
    __slots__ = ("files", "ranges", "layer_start", "layer_end")
    FILES_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[SourceFile]
    ranges: _containers.RepeatedCompositeFieldContainer[ByteRange]
    layer_start: int
    layer_end: int
    def __init__(self, files: _Optional[_Iterable[_Union[SourceFile, _Mapping]]] = ..., ranges: _Optional[_Iterable[_Union[ByteRange, _Mapping]]] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class ShardReceipt(_message.Message):
    __slots__ = ("sha256", "size", "already_cached")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_CACHED_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    already_cached: bool
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ..., already_cached: _Optional[bool] = ...) -> None: ...

class EngineSettings(_message.Message):
    __slots__ = ("context_tokens", "max_sessions", "batch_tokens", "threads", "output_rows")
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ROWS_FIELD_NUMBER: _ClassVar[int]
    context_tokens: int
    max_sessions: int
    batch_tokens: int
    threads: int
    output_rows: int
    def __init__(self, context_tokens: _Optional[int] = ..., max_sessions: _Optional[int] = ..., batch_tokens: _Optional[int] = ..., threads: _Optional[int] = ..., output_rows: _Optional[int] = ...) -> None: ...

class LoadShardRequest(_message.Message):
    __slots__ = ("pipeline_id", "sha256", "layer_start", "layer_end", "engine", "next_address", "codec", "stage_index", "stage_count", "holder", "model", "force", "ring_address")
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    STAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    RING_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    pipeline_id: str
    sha256: str
    layer_start: int
    layer_end: int
    engine: EngineSettings
    next_address: str
    codec: str
    stage_index: int
    stage_count: int
    holder: str
    model: str
    force: bool
    ring_address: str
    def __init__(self, pipeline_id: _Optional[str] = ..., sha256: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., engine: _Optional[_Union[EngineSettings, _Mapping]] = ..., next_address: _Optional[str] = ..., codec: _Optional[str] = ..., stage_index: _Optional[int] = ..., stage_count: _Optional[int] = ..., holder: _Optional[str] = ..., model: _Optional[str] = ..., force: _Optional[bool] = ..., ring_address: _Optional[str] = ...) -> None: ...

class LoadShardReply(_message.Message):
    __slots__ = ("resident_bytes", "load_seconds", "engine", "pipeline_id", "shared")
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    resident_bytes: int
    load_seconds: float
    engine: EngineSettings
    pipeline_id: str
    shared: bool
    def __init__(self, resident_bytes: _Optional[int] = ..., load_seconds: _Optional[float] = ..., engine: _Optional[_Union[EngineSettings, _Mapping]] = ..., pipeline_id: _Optional[str] = ..., shared: _Optional[bool] = ...) -> None: ...

class UnloadRequest(_message.Message):
    __slots__ = ("pipeline_id", "holder")
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    pipeline_id: str
    holder: str
    def __init__(self, pipeline_id: _Optional[str] = ..., holder: _Optional[str] = ...) -> None: ...

class UnloadReply(_message.Message):
    __slots__ = ("was_loaded",)
    WAS_LOADED_FIELD_NUMBER: _ClassVar[int]
    was_loaded: bool
    def __init__(self, was_loaded: _Optional[bool] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed", "grammar", "logprobs", "top_logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPEAT_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPEAT_LAST_N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    seed: int
    grammar: str
    logprobs: bool
    top_logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., repeat_penalty: _Optional[float] = ..., repeat_last_n: _Optional[int] = ..., seed: _Optional[int] = ..., grammar: _Optional[str] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token", "logprob")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token: int
    logprob: float
    def __init__(self, token: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class Hidden(_message.Message):
    __slots__ = ("codec", "rows", "cols", "data")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    codec: str
    rows: int
    cols: int
    data: bytes
    def __init__(self, codec: _Optional[str] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage_index", "compute_ms", "queue_ms", "sent_bytes", "send_ms")
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    SENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEND_MS_FIELD_NUMBER: _ClassVar[int]
    stage_index: int
    compute_ms: float
    queue_ms: float
    sent_bytes: int
    send_ms: float
    def __init__(self, stage_index: _Optional[int] = ..., compute_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., sent_bytes: _Optional[int] = ..., send_ms: _Optional[float] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "worker")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    worker: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., worker: _Optional[str] = ...) -> None: ...

class StageInput(_message.Message):
    __slots__ = ("pipeline_id", "session", "chunk", "start_pos", "tokens", "hidden", "want_token", "sampling", "end_session", "timings", "error", "batched", "ring_left", "ring_stops", "drafted", "draft_k", "draft_ahead", "ahead", "score_rows", "next_token", "copy_to", "embed", "rows")
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    WANT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    END_SESSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BATCHED_FIELD_NUMBER: _ClassVar[int]
    RING_LEFT_FIELD_NUMBER: _ClassVar[int]
    RING_STOPS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_K_FIELD_NUMBER: _ClassVar[int]
    DRAFT_AHEAD_FIELD_NUMBER: _ClassVar[int]
    AHEAD_FIELD_NUMBER: _ClassVar[int]
    SCORE_ROWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    COPY_TO_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    pipeline_id: str
    session: str
    chunk: int
    start_pos: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    hidden: Hidden
    want_token: bool
    sampling: Sampling
    end_session: bool
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    error: Error
    batched: _containers.RepeatedCompositeFieldContainer[StageInput]
    ring_left: int
    ring_stops: _containers.RepeatedScalarFieldContainer[int]
    drafted: int
    draft_k: int
    draft_ahead: bool
    ahead: bool
    score_rows: bool
    next_token: int
    copy_to: _containers.RepeatedScalarFieldContainer[str]
    embed: bool
    rows: EmbeddedRows
    def __init__(self, pipeline_id: _Optional[str] = ..., session: _Optional[str] = ..., chunk: _Optional[int] = ..., start_pos: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[Hidden, _Mapping]] = ..., want_token: _Optional[bool] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., end_session: _Optional[bool] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., batched: _Optional[_Iterable[_Union[StageInput, _Mapping]]] = ..., ring_left: _Optional[int] = ..., ring_stops: _Optional[_Iterable[int]] = ..., drafted: _Optional[int] = ..., draft_k: _Optional[int] = ..., draft_ahead: _Optional[bool] = ..., ahead: _Optional[bool] = ..., score_rows: _Optional[bool] = ..., next_token: _Optional[int] = ..., copy_to: _Optional[_Iterable[str]] = ..., embed: _Optional[bool] = ..., rows: _Optional[_Union[EmbeddedRows, _Mapping]] = ...) -> None: ...

class EmbeddedRows(_message.Message):
    __slots__ = ("ggml_type", "row_bytes", "data")
    GGML_TYPE_FIELD_NUMBER: _ClassVar[int]
    ROW_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ggml_type: int
    row_bytes: int
    data: bytes
    def __init__(self, ggml_type: _Optional[int] = ..., row_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StageOutput(_message.Message):
    __slots__ = ("session", "chunk", "token", "timings", "error", "session_ended", "batch", "drafts", "accepted", "logprob", "ahead", "top_logprobs", "row_scores", "embedding")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SESSION_ENDED_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    AHEAD_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ROW_SCORES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    session: str
    chunk: int
    token: int
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    error: Error
    session_ended: bool
    batch: _containers.RepeatedScalarFieldContainer[int]
    drafts: _containers.RepeatedScalarFieldContainer[int]
    accepted: int
    logprob: float
    ahead: bool
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    row_scores: _containers.RepeatedCompositeFieldContainer[RowScore]
    embedding: Hidden
    def __init__(self, session: _Optional[str] = ..., chunk: _Optional[int] = ..., token: _Optional[int] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., session_ended: _Optional[bool] = ..., batch: _Optional[_Iterable[int]] = ..., drafts: _Optional[_Iterable[int]] = ..., accepted: _Optional[int] = ..., logprob: _Optional[float] = ..., ahead: _Optional[bool] = ..., top_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., row_scores: _Optional[_Iterable[_Union[RowScore, _Mapping]]] = ..., embedding: _Optional[_Union[Hidden, _Mapping]] = ...) -> None: ...

class RowScore(_message.Message):
    __slots__ = ("logprob", "top")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class ForwardSummary(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    def __init__(self, chunks: _Optional[int] = ...) -> None: ...

class ResultsRequest(_message.Message):
    __slots__ = ("pipeline_id",)
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    pipeline_id: str
    def __init__(self, pipeline_id: _Optional[str] = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class EndSessionReply(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...
