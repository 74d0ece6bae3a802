"""The control path's values: what loading a stage asks for, who holds a stage.

Both sides see these and nothing of the wire: ``orchcore.wire.convert`` is the one place
that turns them into protobuf messages and back. Field names follow
``LoadShardRequest`` in ``proto/orch/v1/worker.proto``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from orchcore.config import EngineConfig
from orchcore.shard import LayerRange


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
