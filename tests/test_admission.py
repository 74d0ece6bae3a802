"""LoadShard's decision over its facts: cache, the stage loaded now and its leases, the
shard's header, the memory budget. No gRPC, no engine."""

from __future__ import annotations

from dataclasses import replace

import pytest

from orchcore.config import EngineConfig
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
from worker.admission import Admission, CurrentStage, ShardFacts, admit

ASKED = LoadRequest(pipeline_id="p2", sha256="ab" * 32, layer_start=10, layer_end=20,
                    engine=EngineConfig(threads=2), next_address="host:1", holder="me",
                    model="m.gguf")
SHARD = ShardFacts(LayerRange(10, 20), MemoryEstimate(100 * MIB, 50 * MIB, 10 * MIB, 0, 5 * MIB,
                                                         serving=0))
BUDGET = 1024 * MIB


def decide(asked: LoadRequest = ASKED, *, cached: bool = True,
           current: CurrentStage | None = None, shard: ShardFacts = SHARD,
           budget: int = BUDGET) -> Admission:
    return admit(asked, cached=cached, current=current, shard=shard, budget=budget)


def loaded(request: LoadRequest, others: int = 1) -> CurrentStage:
    return CurrentStage(request, others=others, loaded_at=0.0)


def test_a_cached_shard_that_fits_is_loaded():
    assert decide() is Admission.LOAD
    assert decide(current=loaded(replace(ASKED, layer_start=0), others=0)) is Admission.LOAD


def test_the_very_same_stage_is_shared_whoever_holds_it():
    theirs = replace(ASKED, pipeline_id="p1", holder="them")
    assert decide(current=loaded(theirs)) is Admission.SHARE
    assert decide(current=loaded(theirs), shard=ShardFacts(problem="gone")) is Admission.SHARE


@pytest.mark.parametrize("field", [
    {"codec": "q8_0"}, {"next_address": "host:2"}, {"ring_address": "host:0"},
    {"stage_index": 1}, {"engine": EngineConfig(threads=1)},
    {"engine": EngineConfig(threads=2, context_tokens=1024)},
])
def test_another_stage_on_a_held_worker_is_busy_unless_forced(field):
    theirs = replace(ASKED, pipeline_id="p1", holder="them", **field)
    with pytest.raises(WorkerBusyError, match=r"layers \[10, 20\) of m.gguf for 1 other "
                                              r"orchestrator since .*--force"):
        decide(current=loaded(theirs))
    assert decide(replace(ASKED, force=True), current=loaded(theirs)) is Admission.LOAD
    assert decide(current=loaded(theirs, others=0)) is Admission.LOAD, "its lease lapsed"


def test_a_shard_not_cached_is_asked_for_first():
    with pytest.raises(ShardMissingError, match="abababababab is not cached here; upload"):
        decide(cached=False, current=loaded(ASKED))


def test_over_the_budget_is_refused_with_the_numbers():
    with pytest.raises(MemoryBudgetError, match=r"layers \[10, 20\) need 165 MiB \(weights 50"
                                                r".*budget is 100 MiB; use more workers"):
        decide(budget=100 * MIB)


def test_an_unreadable_shard_is_named_by_the_model():
    with pytest.raises(ShardLoadError, match=r"the shard of layers \[10, 20\) of m.gguf: bad"):
        decide(shard=ShardFacts(problem="bad"))


def test_a_shard_of_other_layers_is_refused():
    with pytest.raises(InvalidInputError, match=r"holds layers \[0, 10\), not \[10, 20\)"):
        decide(shard=replace(SHARD, layers=LayerRange(0, 10)))
