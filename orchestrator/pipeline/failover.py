"""Failover: a pipeline rebuilt without a failed worker, and sessions replayed onto it.

``Replanner`` is what a ``RunningModel`` needs to deploy again, handed over by the
``Cluster`` that opened it: every connected worker (the plan's stages and the standbys),
the model's facts (its file, or where it is published) and the plan options.
``plan_without`` (pure) chooses the workers of the next plan; ``Replanner.open`` deploys a
plan (a worker gets its slice from the model file again unless it built that shard before)
and opens its data path.

``replay`` rebuilds one session on a fresh pipeline from its token history, in the batch
shapes it was first sent in: the prompt in its chunks, then each decode pass (its pending
token, and the drafts it carried to be verified, rejected ones included).
Batch shape moves logits, so only the same shapes give bit-identical KV caches. Every
replayed step samples again (``want_token``) with the session's seed, so the last stage's
sampler ends up having drawn the same random numbers; each re-sampled token must equal the
recorded one, else ``ReplayMismatchError`` (never a silently different answer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from orchcore.devices import DeviceFacts
from orchcore.errors import OrchError, PlanError, SessionError
from orchcore.facts import ModelFacts
from orchcore.wire.status import retryable
from orchestrator.cluster.client import WorkerClient
from orchestrator.pipeline.datapath import DataPath
from orchestrator.pipeline.deploy import (
    Deployment,
    DeployProgress,
    FromSource,
    LogProgress,
    deploy,
    undeploy,
)
from orchestrator.pipeline.inputrows import input_rows
from orchestrator.planning.plan import Plan, PlanOptions, make_plan
from orchestrator.settings import OrchSettings

if TYPE_CHECKING:
    from orchestrator.pipeline.session import Session


class ReplayMismatchError(OrchError):
    """A replayed step sampled another token than the one recorded: the rebuilt session
    would not continue the same answer."""


def calls_for_failover(exc: OrchError) -> bool:
    """Whether ``exc`` is a failure another pipeline may not have: a retryable error, but
    not a full session table (a new plan has as many slots, and rebuilding would not free
    one)."""
    return retryable(exc) and not isinstance(exc, SessionError)


def plan_without(facts: ModelFacts, current: Plan, devices: Sequence[DeviceFacts],
                 excluded: set[str], options: PlanOptions) -> Plan:
    """The next plan without the ``excluded`` workers: the current plan's survivors (in
    stage order), then standbys (connected workers outside the plan, in connection order).
    With ``options.use_all`` (a fixed number of stages) only as many standbys as the plan
    lost are added. Raises ``PlanError`` naming the shortfall when nothing fits."""
    in_plan = {s.worker for s in current.stages}
    survivors = [s.device for s in current.stages if s.worker not in excluded]
    standbys = [d for d in devices if d.address not in in_plan and d.address not in excluded]
    if options.use_all:
        standbys = standbys[:len(current.stages) - len(survivors)]
    candidates = survivors + standbys
    if not candidates:
        raise PlanError("no workers left to run the model on: start or add workers")
    prefer = substituted(current, excluded, standbys) or options.prefer
    return make_plan(facts, candidates, replace(options, prefer=prefer))


def substituted(current: Plan, excluded: set[str], standbys: Sequence[DeviceFacts]
                ) -> tuple[tuple[str, int, int], ...]:
    """The current cut with each lost worker's layers given to a standby, in stage order;
    empty when there are too few standbys. The planner keeps it when it fits and is about
    as good as the best: every survivor then keeps its place and its cached shard, and
    only the lost layers travel."""
    spare = iter(standbys)
    cut = []
    for stage in current.stages:
        device = next(spare, None) if stage.worker in excluded else stage.device
        if device is None:
            return ()
        cut.append((device.worker_id, stage.layers.start, stage.layers.end))
    return tuple(cut)


@dataclass
class Pipeline:
    """One deployed plan and its open data path."""

    plan: Plan
    deployment: Deployment
    path: DataPath


@dataclass
class Replanner:
    """Everything needed to deploy the model again on the cluster's workers."""

    clients: list[WorkerClient]  # every connected worker: stages and standbys
    devices: list[DeviceFacts]
    facts: ModelFacts
    options: PlanOptions
    token: str | None
    settings: OrchSettings
    alive: Callable[[], None] | None = None
    source: FromSource | None = None

    def client(self, address: str) -> WorkerClient:
        return next(c for c in self.clients if c.address == address)

    def plan_without(self, current: Plan, excluded: set[str]) -> Plan:
        return plan_without(self.facts, current, self.devices, excluded, self.options)

    def open(self, plan: Plan, progress: DeployProgress | None = None, *,
             force: bool = False) -> Pipeline:
        """Deploy ``plan`` (stages last first, cached shards not sent) and open its path."""
        clients = [self.client(s.worker) for s in plan.stages]
        deployment = deploy(plan, self.facts, clients, progress or LogProgress(),
                            force=force, source=self.source)
        path = DataPath(plan, deployment.pipeline_id, clients, self.token, self.settings,
                        self.alive, input_rows(self.facts, plan, self.source))
        try:
            path.open()
        except BaseException:
            path.close()
            undeploy(deployment, clients, self.settings.cleanup_deadline_s, skip=path.failed)
            raise
        return Pipeline(plan, deployment, path)


def replay(path: DataPath, session: Session) -> None:
    """Rebuild ``session`` on ``path`` up to its last generated token (which is not fed
    yet): KV caches and sampler state as they were. Every chunk goes out at once, in the
    shapes it was first sent in (the prompt in its chunks, then each pass with the drafts
    it carried, rejected ones included, which the next pass rolls back); the results come
    back in order and are checked against the recorded tokens."""
    if not session.generated:
        return  # nothing entered the model yet that a retry would not send
    chunks, start = [], 0
    for i, part in enumerate(session.prompt_chunks):
        last = i + 1 == len(session.prompt_chunks)
        chunk = path.send(session.id, start, part, want_token=last,
                          sampling=session.sampling if i == 0 else None)
        start += len(part)
    chunks.append((chunk, (session.generated[0],)))
    for step in session.passes:
        chunks.append((path.send(session.id, step.start, step.tokens, want_token=True,
                                 drafted=step.drafted), step.added))
    for n, (chunk, recorded) in enumerate(chunks):
        got = path.wait(session.id, chunk).tokens
        if got != recorded:
            raise ReplayMismatchError(
                f"session {session.id}: replaying step {n} gave tokens {list(got)} where the "
                f"answer had {list(recorded)}; the rebuilt pipeline does not reproduce the "
                f"answer (seed {session.sampling.seed}), so it stops here")
