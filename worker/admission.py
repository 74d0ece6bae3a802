"""Whether a worker takes a stage it is asked to load: the decision ``LoadShard`` acts on.

Pure: the servicer gathers the facts (is the shard cached, what its header says, what is
loaded now and who holds it, the memory budget), ``admit`` decides, and the servicer acts
(shares the stage, or unloads what it holds and builds the new one). Every refusal is a
typed error that says what to do.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from orchcore.control import LoadRequest
from orchcore.errors import (
    InvalidInputError,
    MemoryBudgetError,
    ShardLoadError,
    ShardMissingError,
    WorkerBusyError,
)
from orchcore.memory import MIB, MemoryEstimate
from orchcore.shard import LayerRange


class Admission(enum.Enum):
    SHARE = "share"  # the very same stage is loaded: hold a lease on it too
    LOAD = "load"  # unload what is held (if anything) and load the requested stage


@dataclass(frozen=True)
class CurrentStage:
    """The stage loaded now, as an admission sees it."""

    request: LoadRequest
    others: int  # orchestrators other than the asker holding live leases on it
    loaded_at: float  # unix time


@dataclass(frozen=True)
class ShardFacts:
    """The cached shard, read from its header; ``problem`` when it cannot be read."""

    layers: LayerRange | None = None
    needed: MemoryEstimate | None = None  # the whole process with this stage loaded
    problem: str | None = None


def admit(request: LoadRequest, *, cached: bool, current: CurrentStage | None,
          shard: ShardFacts, budget: int) -> Admission:
    """Share the loaded stage, load the requested one, or raise why not."""
    if not cached:
        raise ShardMissingError(f"shard {request.sha256[:12]} is not cached here; upload "
                                f"it first")
    if current is not None and current.request.same_stage(request):
        return Admission.SHARE
    if current is not None and current.others and not request.force:
        raise WorkerBusyError(busy(current))
    asked = f"[{request.layer_start}, {request.layer_end})"
    if shard.problem is not None or shard.needed is None or shard.layers is None:
        raise ShardLoadError(f"the shard of layers {asked} of {request.model or 'the model'}: "
                             f"{shard.problem or 'unreadable'}")
    if shard.needed.total > budget:
        raise MemoryBudgetError(
            f"layers {asked} need {shard.needed.describe()}, but the memory budget is "
            f"{budget // MIB} MiB; use more workers, a shorter context, or raise "
            f"--memory-budget-mb")
    if (shard.layers.start, shard.layers.end) != (request.layer_start, request.layer_end):
        raise InvalidInputError(f"shard {request.sha256[:12]} holds layers {shard.layers}, "
                                f"not {asked}")
    return Admission.LOAD


def busy(current: CurrentStage) -> str:
    """Why the worker is busy, and what to do."""
    since = time.strftime("%H:%M:%S", time.localtime(current.loaded_at))
    count, asked = current.others, current.request
    return (f"busy: it runs layers [{asked.layer_start}, {asked.layer_end}) of "
            f"{asked.model or 'another model'} for {count} other "
            f"orchestrator{'s' if count > 1 else ''} since {since}; wait for it to finish, "
            f"use other workers, or take the worker over with --force")
