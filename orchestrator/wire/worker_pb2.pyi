from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("arch", "cached_shards", "cores", "cpu_flags", "cpu_model", "hostname", "loaded", "memory_budget_bytes", "protocol_version", "ram_available_bytes", "ram_total_bytes", "software_version", "worker_id")
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
    def __init__(self, protocol_version: int | None = ..., worker_id: str | None = ..., hostname: str | None = ..., software_version: str | None = ..., ram_total_bytes: int | None = ..., ram_available_bytes: int | None = ..., memory_budget_bytes: int | None = ..., cores: int | None = ..., cpu_model: str | None = ..., cpu_flags: _Iterable[str] | None = ..., arch: str | None = ..., cached_shards: _Iterable[str] | None = ..., loaded: LoadedShard | _Mapping | None = ...) -> None: ...

class LoadedShard(_message.Message):
    __slots__ = ("layer_end", "layer_start", "pipeline_id", "resident_bytes", "sha256", "source_layers")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    layer_start: int
    layer_end: int
    source_layers: int
    pipeline_id: str
    resident_bytes: int
    def __init__(self, sha256: str | None = ..., layer_start: int | None = ..., layer_end: int | None = ..., source_layers: int | None = ..., pipeline_id: str | None = ..., resident_bytes: int | None = ...) -> None: ...

class ShardChunk(_message.Message):
    __slots__ = ("data", "sha256", "size")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    data: bytes
    def __init__(self, sha256: str | None = ..., size: int | None = ..., data: bytes | None = ...) -> None: ...

class ShardReceipt(_message.Message):
    __slots__ = ("already_cached", "sha256", "size")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_CACHED_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    already_cached: bool
    def __init__(self, sha256: str | None = ..., size: int | None = ..., already_cached: bool | None = ...) -> None: ...

class EngineSettings(_message.Message):
    __slots__ = ("batch_tokens", "context_tokens", "max_sessions", "threads")
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    context_tokens: int
    max_sessions: int
    batch_tokens: int
    threads: int
    def __init__(self, context_tokens: int | None = ..., max_sessions: int | None = ..., batch_tokens: int | None = ..., threads: int | None = ...) -> None: ...

class LoadShardRequest(_message.Message):
    __slots__ = ("codec", "engine", "layer_end", "layer_start", "next_address", "pipeline_id", "sha256", "stage_count", "stage_index")
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    STAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    pipeline_id: str
    sha256: str
    layer_start: int
    layer_end: int
    engine: EngineSettings
    next_address: str
    codec: str
    stage_index: int
    stage_count: int
    def __init__(self, pipeline_id: str | None = ..., sha256: str | None = ..., layer_start: int | None = ..., layer_end: int | None = ..., engine: EngineSettings | _Mapping | None = ..., next_address: str | None = ..., codec: str | None = ..., stage_index: int | None = ..., stage_count: int | None = ...) -> None: ...

class LoadShardReply(_message.Message):
    __slots__ = ("load_seconds", "resident_bytes")
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    resident_bytes: int
    load_seconds: float
    def __init__(self, resident_bytes: int | None = ..., load_seconds: float | None = ...) -> None: ...

class UnloadRequest(_message.Message):
    __slots__ = ("pipeline_id",)
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    pipeline_id: str
    def __init__(self, pipeline_id: str | None = ...) -> None: ...

class UnloadReply(_message.Message):
    __slots__ = ("was_loaded",)
    WAS_LOADED_FIELD_NUMBER: _ClassVar[int]
    was_loaded: bool
    def __init__(self, was_loaded: bool | None = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("min_p", "repeat_last_n", "repeat_penalty", "seed", "temperature", "top_k", "top_p")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPEAT_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPEAT_LAST_N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    seed: int
    def __init__(self, temperature: float | None = ..., top_k: int | None = ..., top_p: float | None = ..., min_p: float | None = ..., repeat_penalty: float | None = ..., repeat_last_n: int | None = ..., seed: int | None = ...) -> None: ...

class Hidden(_message.Message):
    __slots__ = ("codec", "cols", "data", "rows")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    codec: str
    rows: int
    cols: int
    data: bytes
    def __init__(self, codec: str | None = ..., rows: int | None = ..., cols: int | None = ..., data: bytes | None = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("compute_ms", "queue_ms", "send_ms", "sent_bytes", "stage_index")
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
    def __init__(self, stage_index: int | None = ..., compute_ms: float | None = ..., queue_ms: float | None = ..., sent_bytes: int | None = ..., send_ms: float | None = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "worker")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    worker: str
    def __init__(self, code: str | None = ..., message: str | None = ..., worker: str | None = ...) -> None: ...

class StageInput(_message.Message):
    __slots__ = ("chunk", "end_session", "error", "hidden", "pipeline_id", "sampling", "sent_at", "session", "start_pos", "timings", "tokens", "want_token")
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
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
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
    sent_at: float
    def __init__(self, pipeline_id: str | None = ..., session: str | None = ..., chunk: int | None = ..., start_pos: int | None = ..., tokens: _Iterable[int] | None = ..., hidden: Hidden | _Mapping | None = ..., want_token: bool | None = ..., sampling: Sampling | _Mapping | None = ..., end_session: bool | None = ..., timings: _Iterable[StageTiming | _Mapping] | None = ..., error: Error | _Mapping | None = ..., sent_at: float | None = ...) -> None: ...

class StageOutput(_message.Message):
    __slots__ = ("chunk", "error", "sent_at", "session", "session_ended", "timings", "token")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SESSION_ENDED_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    session: str
    chunk: int
    token: int
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    error: Error
    session_ended: bool
    sent_at: float
    def __init__(self, session: str | None = ..., chunk: int | None = ..., token: int | None = ..., timings: _Iterable[StageTiming | _Mapping] | None = ..., error: Error | _Mapping | None = ..., session_ended: bool | None = ..., sent_at: float | None = ...) -> None: ...

class ForwardSummary(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    def __init__(self, chunks: int | None = ...) -> None: ...

class ResultsRequest(_message.Message):
    __slots__ = ("pipeline_id",)
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    pipeline_id: str
    def __init__(self, pipeline_id: str | None = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: str | None = ...) -> None: ...

class EndSessionReply(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: bool | None = ...) -> None: ...
