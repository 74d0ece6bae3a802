"""The control path's values: what a worker reports, what loading a stage asks for, who
holds a stage, what storing a shard, probing a speed or measuring a link came to.

Both sides see these and nothing of the wire: ``orchcore.wire.convert`` is the one place
that turns them into protobuf messages and back. Field names follow the messages of
``proto/orch/v1/worker.proto`` (``WorkerInfo``, ``LoadedShard``, ``LoadShardRequest``,
``ShardReceipt``, ``ProbeReply``, ``LinkMeasure``, ...), whose comments say what each
field means.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from orchcore.chunks import ChunkError
from orchcore.config import EngineConfig
from orchcore.devices import DeviceFacts
from orchcore.rangefetch import RemoteFile
from orchcore.shard import LayerRange
from orchcore.slices import ByteRange


@dataclass(frozen=True)
class LoadRequest:
    """Load a cached shard as one stage of a pipeline, under the asker's lease."""

    pipeline_id: str
    sha256: str
    layer_start: int  # must match the shard's own metadata
    layer_end: int
    engine: EngineConfig  # on a worker: threads resolved to what it runs with
    next_address: str = ""  # the next stage's host:port; empty for the last stage
    codec: str = "f32"  # hidden-state codec towards the next stage
    stage_index: int = 0
    stage_count: int = 1
    holder: str = ""  # who asks: it holds a lease on the stage from now on
    model: str = ""  # the model's file name, for other orchestrators to see
    force: bool = False  # replace a stage another orchestrator holds
    ring_address: str = ""  # the last stage's: stage 0's host:port (the token ring)

    @property
    def layers(self) -> LayerRange:
        return LayerRange(self.layer_start, self.layer_end)

    def same_stage(self, other: LoadRequest) -> bool:
        """Whether ``other`` asks for exactly this stage (then it is shared, not reloaded):
        everything but the pipeline, the asker and its lease."""
        def stage(r: LoadRequest) -> tuple:
            return (r.sha256, r.layer_start, r.layer_end, r.next_address, r.codec,
                    r.stage_index, r.stage_count, r.engine, r.ring_address)
        return stage(self) == stage(other)


class Holder(NamedTuple):
    """An orchestrator holding a live lease on a stage."""

    id: str  # random per run
    since: float  # unix time the lease was taken
    expires_in_s: float


class LoadReply(NamedTuple):
    """What loading a stage came to."""

    resident_bytes: int  # the whole worker process with this stage, estimated
    load_seconds: float
    engine: EngineConfig  # the settings as applied (threads bounded by the cores)
    pipeline_id: str  # the pipeline now held: another's when it was shared
    shared: bool = False  # the very same stage was loaded already: now shared


class Lease(NamedTuple):
    """One orchestrator's hold on a pipeline's stage (what Renew and Unload name)."""

    pipeline_id: str
    holder: str


@dataclass(frozen=True)
class LoadedStage:
    """The stage a worker runs, as its Info reports it."""

    sha256: str
    layer_start: int
    layer_end: int
    source_layers: int  # layers of the whole model
    pipeline_id: str
    resident_bytes: int
    fault: ChunkError | None = None  # the stage failed outside a chunk's own error path
    holders: tuple[Holder, ...] = ()  # orchestrators holding live leases on it
    model: str = ""  # the model's file name, as the orchestrator gave it
    sessions: int = 0  # sessions holding KV cache on it now

    @property
    def layers(self) -> LayerRange:
        return LayerRange(self.layer_start, self.layer_end)


@dataclass(frozen=True)
class WorkerReport:
    """What a worker is and holds: its answer to Info, the health check."""

    protocol_version: int
    worker_id: str  # stable per machine and cache folder
    hostname: str
    software_version: str
    ram_total_bytes: int
    ram_available_bytes: int
    memory_budget_bytes: int  # the most this worker's whole process may use
    cores: int
    cpu_model: str
    cpu_flags: tuple[str, ...]
    arch: str
    cached_shards: tuple[str, ...]  # sha256 of the shards in its cache
    loaded: LoadedStage | None  # None when nothing is loaded
    host_id: str  # the same for every worker on one running machine (they share its RAM)
    cache_used_bytes: int
    cache_free_bytes: int  # on the cache's disk
    cache_max_bytes: int
    threads: int  # llama.cpp threads it runs with (what its speed was probed with)
    # What its process holds with nothing loaded, measured at start with a warmed engine
    # (``orchcore.memory.measure_baseline``); 0 = not measured (an older worker).
    baseline_bytes: int = 0

    def device(self, address: str) -> DeviceFacts:
        """The planner's view of this worker, reached at ``address``."""
        cores = max(1, self.cores)
        return DeviceFacts(
            address=address, worker_id=self.worker_id,
            host_id=self.host_id or self.worker_id,  # unknown host: a machine of its own
            hostname=self.hostname, arch=self.arch, cores=cores,
            ram_total_bytes=self.ram_total_bytes,
            ram_available_bytes=self.ram_available_bytes,
            memory_budget_bytes=self.memory_budget_bytes, threads=min(self.threads, cores),
            baseline_bytes=self.baseline_bytes or None)


class ShardReceipt(NamedTuple):
    """A shard the worker now holds in its cache."""

    sha256: str
    size: int
    already_cached: bool = False  # it was there before: nothing was stored or fetched


class ShardUpload(NamedTuple):
    """An upload of a whole shard (the tests' and fuzzers' way in): its sha256, its size
    and its bytes as they arrive."""

    sha256: str
    size: int
    data: Iterator[bytes]


class SliceUpload(NamedTuple):
    """An upload of a slice of the model (the orchestrator's way): the files it comes from,
    the byte ranges sent one after the other (``data``), the layers the worker cuts."""

    files: tuple[RemoteFile, ...]
    ranges: tuple[ByteRange, ...]
    layers: LayerRange
    size: int
    data: Iterator[bytes]


class FetchProgress(NamedTuple):
    """How far a worker fetching its slice has come; the last one names the shard."""

    done: int  # bytes fetched so far (ranges cached earlier count as done)
    total: int
    shard: ShardReceipt | None = None


class ProbeResult(NamedTuple):
    """A worker's time for one layer of a given shape."""

    decode_s_per_layer: float  # one token through one layer
    prefill_s_per_token_per_layer: float
    cached: bool = False  # measured before, for the same shape


class LinkMeasurement(NamedTuple):
    """A worker's link to another worker, as it measured it."""

    rtt_s: float = 0.0
    bandwidth_bytes_s: float = 0.0
    error: str = ""  # the other worker could not be measured: why


class Proof(NamedTuple):
    """A worker's answer to Prove: HMACs of the asker's nonce under the tokens it holds
    (``orchcore.discovery.proof``); empty for a token it does not hold."""

    proof: bytes
    previous_proof: bytes
    worker_id: str
