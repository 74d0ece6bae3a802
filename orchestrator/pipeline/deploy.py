"""Deployment: each stage's shard written, sent unless the worker has it, and loaded.

Shards are written by the orchestrator from the model file and kept in ``ShardStore``
while the source file is unchanged; workers keep received shards by sha256, so a second
run sends nothing. Stages are loaded last first, so each one's next stage is listening
when it connects.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from orchcore.control import LoadReply, LoadRequest
from orchcore.errors import OrchError, SourceFetchError
from orchcore.facts import ModelFacts
from orchcore.files import read_json, write_atomic
from orchcore.rangefetch import RemoteFile
from orchcore.shard import SHARD_FORMAT, LayerRange, write_shard
from orchcore.slices import shard_ranges, total_bytes
from orchestrator.cluster.client import WorkerClient
from orchestrator.planning.plan import Plan, StagePlan

log = logging.getLogger(__name__)


class ShardStore:
    """Shards written by the orchestrator, reused while the source file is unchanged."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, facts: ModelFacts, layers: LayerRange,
            progress: Callable[[int, int], None] | None = None) -> tuple[Path, str]:
        stats = [p.stat() for p in facts.parts]  # every file of a split set
        size, mtime = sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)
        key = f"{facts.path.stem}-{size}-{mtime}-{layers.start}-{layers.end}-v{SHARD_FORMAT}"
        path, meta = self.root / f"{key}.gguf", self.root / f"{key}.json"
        if path.exists() and "sha256" in (known := read_json(meta)):
            return path, known["sha256"]
        self.root.mkdir(parents=True, exist_ok=True)
        shard = write_shard(facts.path, layers, path, facts=facts, progress=progress)
        write_atomic(meta, json.dumps({"sha256": shard.sha256, "source": str(facts.path)}))
        return path, shard.sha256


class DeployProgress(Protocol):
    """Where deployment reports its steps; ``task`` returns ``advance(done, total)``. A step
    ``alone`` replaces the one before; others run side by side (one per worker)."""

    def task(self, description: str, total: int | None, *, alone: bool = True
             ) -> Callable[[int, int], None]: ...

    def note(self, text: str) -> None: ...


class LogProgress:
    def task(self, description: str, total: int | None, *, alone: bool = True
             ) -> Callable[[int, int], None]:
        log.info("%s", description)
        return lambda done, total: None

    def note(self, text: str) -> None:
        log.warning("%s", text)


@dataclass(frozen=True)
class FromSource:
    """Workers fetch their slices from where the model is published."""

    files: tuple[RemoteFile, ...]
    whole: Callable[[], ModelFacts] | None  # the file pulled here, for workers that cannot;
    #                                          None: they fail (--fetch workers)


@dataclass(frozen=True)
class Deployment:
    pipeline_id: str
    holder: str  # our lease on every stage
    sent_bytes: int  # shard bytes uploaded: 0 when every worker had its shard cached
    shared: bool  # the stages were loaded already, by another orchestrator: now shared
    fetched_bytes: int = 0  # bytes the workers fetched from the model's source


def deploy(plan: Plan, facts: ModelFacts, clients: Sequence[WorkerClient], store: ShardStore,
           progress: DeployProgress | None = None, *, force: bool = False,
           source: FromSource | None = None) -> Deployment:
    """Load every stage of ``plan``, last stage first, each under a lease of ours.

    With ``source``, ``facts`` are read from headers only: each worker fetches its own slice
    (all at once), and only those that cannot get shards written from the whole file.
    A worker that already runs the very same stage shares it; the pipeline then keeps the
    id the last stage already has, so the whole chain agrees on it.
    """
    progress = progress or LogProgress()
    pipeline_id, holder = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]
    fetched: dict[int, tuple[str, int]] = {}
    if source is not None:
        fetched = fetch_slices(plan, facts, clients, source, progress)
        if len(fetched) < len(plan.stages):
            facts = source.whole()  # type: ignore[misc]  # fetch_slices raised without it
    sent, shared, loaded = 0, [], []
    leases = _KeptLeases(holder, clients[0].settings.lease_renew_s)
    try:
        with leases:
            for stage in reversed(plan.stages):
                client = clients[stage.index]
                sha = fetched[stage.index][0] if stage.index in fetched else None
                reply, n = _deploy_stage(plan, stage, client, facts, store, pipeline_id,
                                         holder, progress, force, sha)
                loaded.append(client)
                pipeline_id = reply.pipeline_id or pipeline_id
                leases.hold(loaded, pipeline_id)
                sent += n
                shared.append(reply.shared)
    except BaseException:  # give back what we hold, or it stays busy until the lease lapses
        deadline = clients[0].settings.cleanup_deadline_s
        undeploy(Deployment(pipeline_id, holder, sent, False), loaded, deadline)
        raise
    return Deployment(pipeline_id, holder, sent, all(shared),
                      sum(n for _, n in fetched.values()))


class _KeptLeases:
    """Our leases on the stages loaded so far, renewed while the others load: sending a
    large model's shards takes minutes, and a lease lapses 30 s after its last renewal
    (``RunningModel`` renews them once the pipeline is open)."""

    def __init__(self, holder: str, every_s: float) -> None:
        self.holder, self.every_s = holder, every_s
        self._clients: list[WorkerClient] = []
        self._pipeline_id = ""
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="deploy-leases", daemon=True)

    def hold(self, clients: Sequence[WorkerClient], pipeline_id: str) -> None:
        with self._lock:
            self._clients, self._pipeline_id = list(clients), pipeline_id

    def __enter__(self) -> _KeptLeases:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _renew(self) -> None:
        while not self._done.wait(self.every_s):
            with self._lock:
                clients, pipeline_id = list(self._clients), self._pipeline_id
            for client in clients:
                try:
                    client.renew(pipeline_id, self.holder, client.settings.probe_deadline_s)
                except OrchError as exc:  # a dead worker shows up when its stage is used
                    log.debug("renewing the lease on %s while deploying: %s",
                              client.address, exc)


def fetch_slices(plan: Plan, facts: ModelFacts, clients: Sequence[WorkerClient],
                 source: FromSource, progress: DeployProgress) -> dict[int, tuple[str, int]]:
    """Every worker fetches its slice at once; returns {stage: (shard sha256, bytes fetched)}
    of those that could. Those that could not are named; without ``source.whole`` that is
    an error."""
    def one(stage: StagePlan) -> tuple[str, int]:
        ranges = shard_ranges(facts, stage.layers)
        size = total_bytes(ranges)
        advance = progress.task(f"{stage.worker} fetching layers {stage.layers}", size,
                                alone=False)
        got = clients[stage.index].fetch_shard(source.files, ranges, stage.layers, advance)
        return got.sha256, 0 if got.already_cached else size

    done, failed = {}, []
    with ThreadPoolExecutor(max_workers=len(plan.stages)) as pool:
        futures = {s.index: pool.submit(one, s) for s in plan.stages}
        for index, future in futures.items():
            try:
                done[index] = future.result()
            except SourceFetchError as exc:
                failed.append(str(exc))  # names the worker
    if failed and source.whole is None:
        raise SourceFetchError("workers cannot fetch the model from its source:\n  " +
                               "\n  ".join(failed) + "\nrun with --fetch auto to send "
                               "them shards from here instead")
    for line in failed:
        progress.note(f"{line}; this machine downloads the model and sends that worker its "
                      f"shard instead (--fetch workers: stop instead)")
    return done


def _deploy_stage(plan: Plan, stage: StagePlan, client: WorkerClient, facts: ModelFacts,
                  store: ShardStore, pipeline_id: str, holder: str, progress: DeployProgress,
                  force: bool, fetched: str | None) -> tuple[LoadReply, int]:
    """Give the worker its shard (unless it fetched it) and load it; returns the bytes sent."""
    sha, sent = (fetched, 0) if fetched is not None else _send(stage, client, facts, store,
                                                                progress)
    progress.task(f"loading layers {stage.layers} on {stage.worker}", None)
    last = stage.index + 1 == len(plan.stages)
    reply = client.load_shard(LoadRequest(
        pipeline_id=pipeline_id, sha256=sha, layer_start=stage.layers.start,
        layer_end=stage.layers.end,
        next_address="" if last else plan.stages[stage.index + 1].worker,
        ring_address=plan.stages[0].worker if last else "",
        codec=plan.codec, stage_index=stage.index, stage_count=len(plan.stages),
        engine=stage.engine, holder=holder, model=plan.model.name,
        force=force))
    return reply, sent


def _send(stage: StagePlan, client: WorkerClient, facts: ModelFacts, store: ShardStore,
          progress: DeployProgress) -> tuple[str, int]:
    """Write the stage's shard here and upload it unless the worker has it cached."""
    path, sha = store.get(facts, stage.layers,
                          progress=progress.task(f"writing layers {stage.layers}", None))
    sent = 0
    if sha not in client.info().cached_shards:
        size = path.stat().st_size
        advance = progress.task(f"sending layers {stage.layers} to {stage.worker}", size)

        def on_chunk(n: int) -> None:
            nonlocal sent
            sent += n
            advance(sent, size)

        client.upload_shard(path, sha, on_chunk)
    return sha, sent


def undeploy(deployment: Deployment, clients: Sequence[WorkerClient], deadline_s: float,
             skip: set[str] = frozenset()) -> None:
    """Give up our lease on every stage in stage order (upstream first, so nothing is sent
    to a stage that is gone), with short deadlines, never waiting on workers known dead.
    A stage another orchestrator still holds stays loaded."""
    for client in clients:
        if client.address in skip:
            continue
        try:
            client.unload(deployment.pipeline_id, deployment.holder, deadline_s)
        except OrchError as exc:
            log.debug("unload on %s: %s", client.address, exc)
