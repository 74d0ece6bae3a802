"""The plan: which layers run where, with which engine settings. A pure value.

``make_plan(model facts, devices, options) -> Plan`` reads no file and opens no socket.
It is made once, shown to the user before anything is sent, and then deployed; nobody
re-derives it. Devices are ``DeviceFacts`` (one per worker, in pipeline order); workers
reporting the same host share that host's RAM.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from orchcore.codecs import get_codec
from orchcore.config import EngineConfig
from orchcore.devices import DeviceFacts
from orchcore.errors import PlanError
from orchcore.facts import ModelFacts
from orchcore.memory import MIB, MemoryEstimate, estimate_stage
from orchcore.shard import LayerRange, even_ranges


@dataclass(frozen=True)
class PlanOptions:
    codec: str = "f32"
    engine: EngineConfig = field(default_factory=EngineConfig)  # threads 0 = device cores


@dataclass(frozen=True)
class StagePlan:
    index: int
    layers: LayerRange
    device: DeviceFacts
    engine: EngineConfig  # threads resolved for this device
    memory: MemoryEstimate

    @property
    def worker(self) -> str:
        return self.device.address


@dataclass(frozen=True)
class Plan:
    model: Path
    n_layers: int
    stages: tuple[StagePlan, ...]
    codec: str

    @property
    def batch_tokens(self) -> int:
        return self.stages[0].engine.batch_tokens

    @property
    def context_tokens(self) -> int:
        return self.stages[0].engine.context_tokens

    def stage_of(self, address: str) -> StagePlan | None:
        return next((s for s in self.stages if s.worker == address), None)

    def describe(self) -> list[str]:
        lines = []
        for s in self.stages:
            budget = s.device.memory_budget_bytes / MIB
            lines.append(f"stage {s.index}: layers {s.layers} on {s.device.label}: "
                         f"{s.memory.total / MIB:.0f} of {budget:.0f} MiB, "
                         f"{s.engine.threads} threads")
        engine = self.stages[0].engine
        lines.append(f"context {engine.context_tokens} tokens x {engine.max_sessions} "
                     f"sessions, chunks of {engine.batch_tokens}, {self.codec} between stages")
        return lines


def make_plan(facts: ModelFacts, devices: Sequence[DeviceFacts],
              options: PlanOptions = PlanOptions()) -> Plan:
    """Contiguous, even layer ranges over ``devices`` in order, checked against their memory.

    Raises ``PlanError`` saying what is missing when the stages do not fit.
    """
    get_codec(options.codec)  # refuses an unknown codec, naming the valid ones
    facts.require_supported()
    _check_devices(facts, devices)
    stages = []
    for i, (layers, device) in enumerate(zip(even_ranges(facts.n_layers, len(devices)),
                                             devices, strict=True)):
        engine = replace(options.engine, threads=options.engine.threads or device.cores)
        stages.append(StagePlan(i, layers, device, engine,
                                estimate_stage(facts, layers, engine)))
    plan = Plan(facts.path, facts.n_layers, tuple(stages), options.codec)
    _check_memory(plan)
    return plan


def _check_devices(facts: ModelFacts, devices: Sequence[DeviceFacts]) -> None:
    if not devices:
        raise PlanError("no workers to run the model on")
    if len(devices) > facts.n_layers:
        raise PlanError(f"{len(devices)} workers for {facts.n_layers} layers: every worker "
                        f"needs at least one layer; use at most {facts.n_layers} workers")
    seen: dict[str, str] = {}
    for d in devices:
        if d.worker_id in seen:
            raise PlanError(f"{seen[d.worker_id]} and {d.address} are the same worker "
                            f"(id {d.worker_id[:8]}); list each worker once")
        seen[d.worker_id] = d.address


def _check_memory(plan: Plan) -> None:
    missing = [f"stage {s.index} (layers {s.layers}) on {s.worker} needs "
               f"{s.memory.describe()}, but its budget is "
               f"{s.device.memory_budget_bytes / MIB:.0f} MiB"
               for s in plan.stages if s.memory.total > s.device.memory_budget_bytes]
    by_host: dict[str, list[StagePlan]] = defaultdict(list)
    for s in plan.stages:
        by_host[s.device.host_id].append(s)
    for stages in by_host.values():
        if len(stages) < 2:
            continue
        need = sum(s.memory.total for s in stages)
        have = max(s.device.ram_available_bytes for s in stages)
        if need > have:
            names = ", ".join(s.worker for s in stages)
            missing.append(f"workers {names} share one machine ({stages[0].device.hostname}) "
                           f"and need {need / MIB:.0f} MiB together, but it has "
                           f"{have / MIB:.0f} MiB available")
    if missing:
        raise PlanError("the model does not fit: " + "; ".join(missing) +
                        ". Add workers, shorten the context (--context), hold fewer "
                        "sessions (--max-sessions), or raise the workers' "
                        "--memory-budget-mb")
