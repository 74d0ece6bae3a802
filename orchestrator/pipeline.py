"""A model running across workers: the plan (a value), its deployment, and generation.

``make_plan`` is pure: model facts + worker addresses -> one ``Plan``, made once here and
sent to the workers; nobody re-derives it. ``Pipeline`` deploys it (writes each shard,
uploads it unless the worker has it cached by hash, loads it with the address of the next
stage) and then drives generation: token ids go to stage 0, token ids come back from the
last stage, hidden states flow stage to stage without passing through here.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc

from orchestrator.client import WorkerClient, data_path_error, rpc_error
from orchestrator.codecs import CODEC_NAMES, UnknownCodecError
from orchestrator.errors import OrchError, WorkerUnreachableError
from orchestrator.facts import ModelFacts
from orchestrator.shard import SHARD_FORMAT, LayerRange, even_ranges, write_shard
from orchestrator.wire import convert
from orchestrator.wire import worker_pb2 as pb
from worker.sampling import SamplingParams
from worker.stage import auth_metadata

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often a wait for results checks that every worker is alive
SUBSCRIBE_DEADLINE_S = 10.0


@dataclass(frozen=True)
class StagePlan:
    index: int
    layers: LayerRange
    worker: str  # host:port


@dataclass(frozen=True)
class Plan:
    model: Path
    n_layers: int
    stages: tuple[StagePlan, ...]
    codec: str
    context_tokens: int
    max_sessions: int
    batch_tokens: int

    def describe(self) -> list[str]:
        return [f"stage {s.index}: layers {s.layers} on {s.worker}" for s in self.stages]


def make_plan(facts: ModelFacts, workers: Sequence[str], *, codec: str = "f32",
              context_tokens: int = 2048, max_sessions: int = 2, batch_tokens: int = 256
              ) -> Plan:
    """Contiguous, even layer ranges in worker order (the speed-aware planner replaces the
    cut, not the shape of this value)."""
    if codec not in CODEC_NAMES:
        raise UnknownCodecError(f"unknown codec {codec!r}; choose one of {', '.join(CODEC_NAMES)}")
    facts.require_supported()
    ranges = even_ranges(facts.n_layers, len(workers))
    stages = tuple(StagePlan(i, r, w)
                   for i, (r, w) in enumerate(zip(ranges, workers, strict=True)))
    return Plan(facts.path, facts.n_layers, stages, codec, context_tokens, max_sessions,
                batch_tokens)


@dataclass
class StepStats:
    """What one generation cost, for ``--stats``."""

    prompt_tokens: int = 0
    prompt_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    compute_ms: dict[int, float] = field(default_factory=dict)  # per stage, decode steps
    wire_bytes: dict[int, int] = field(default_factory=dict)  # per hop, decode steps
    first_token_s: float = 0.0

    def add_decode(self, timings: Sequence[pb.StageTiming]) -> None:
        for t in timings:
            self.compute_ms[t.stage_index] = self.compute_ms.get(t.stage_index, 0) + t.compute_ms
            if t.sent_bytes:
                self.wire_bytes[t.stage_index] = (self.wire_bytes.get(t.stage_index, 0)
                                                  + t.sent_bytes)


class ShardStore:
    """Shards written by the orchestrator, reused while the source file is unchanged."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, facts: ModelFacts, layers: LayerRange,
            progress: Callable[[int, int], None] | None = None) -> tuple[Path, str]:
        stat = facts.path.stat()
        key = (f"{facts.path.stem}-{stat.st_size}-{stat.st_mtime_ns}-{layers.start}-"
               f"{layers.end}-v{SHARD_FORMAT}")
        path, meta = self.root / f"{key}.gguf", self.root / f"{key}.json"
        if path.exists() and meta.exists():
            return path, json.loads(meta.read_text())["sha256"]
        self.root.mkdir(parents=True, exist_ok=True)
        shard = write_shard(facts.path, layers, path, facts=facts, progress=progress)
        tmp = meta.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"sha256": shard.sha256, "source": str(facts.path)}))
        os.replace(tmp, meta)
        return path, shard.sha256


class DeployProgress(Protocol):
    """Where deployment reports its steps; ``task`` returns ``advance(done, total)``."""

    def task(self, description: str, total: int | None) -> Callable[[int, int], None]: ...


class LogProgress:
    def task(self, description: str, total: int | None) -> Callable[[int, int], None]:
        log.info("%s", description)
        return lambda done, total: None


class Pipeline:
    def __init__(self, plan: Plan, facts: ModelFacts, token: str | None,
                 alive: Callable[[], None] | None = None) -> None:
        self.plan = plan
        self.facts = facts
        self.token = token
        self.id = uuid.uuid4().hex[:12]
        self.clients = [WorkerClient(s.worker, token) for s in plan.stages]
        self._alive_check = alive
        # Results are routed per session, so several sessions can be in flight at once.
        self._results: dict[str, queue.SimpleQueue[pb.StageOutput | Exception]] = {}
        self._broken: Exception | None = None
        self._subscribed = threading.Event()
        self._inputs: queue.SimpleQueue[pb.StageInput | None] = queue.SimpleQueue()
        self._forward: grpc.Future | None = None
        self._results_call = None
        self._chunk = 0
        self._lock = threading.Lock()

    # --- deployment --------------------------------------------------------------------

    def check_workers(self) -> list[pb.WorkerInfo]:
        return [c.check_protocol() for c in self.clients]

    def deploy(self, store: ShardStore, progress: DeployProgress | None = None) -> None:
        """Write, send and load every stage's shard (last stage first); then open the data
        path."""
        for stage, client in zip(reversed(self.plan.stages), reversed(self.clients),
                                 strict=True):
            self._deploy_stage(stage, client, store, progress or LogProgress())
        self._open_streams()

    def _deploy_stage(self, stage: StagePlan, client: WorkerClient, store: ShardStore,
                      progress: DeployProgress) -> None:
        plan = self.plan
        path, sha = store.get(self.facts, stage.layers,
                              progress=progress.task(f"writing layers {stage.layers}", None))
        if sha not in client.info().cached_shards:
            size = path.stat().st_size
            advance = progress.task(f"sending layers {stage.layers} to {stage.worker}", size)
            sent = 0

            def on_chunk(n: int) -> None:
                nonlocal sent
                sent += n
                advance(sent, size)

            client.upload_shard(path, sha, on_chunk)
        progress.task(f"loading layers {stage.layers} on {stage.worker}", None)
        last = stage.index + 1 == len(plan.stages)
        client.load_shard(pb.LoadShardRequest(
            pipeline_id=self.id, sha256=sha, layer_start=stage.layers.start,
            layer_end=stage.layers.end, next_address="" if last else
            plan.stages[stage.index + 1].worker, codec=plan.codec,
            stage_index=stage.index, stage_count=len(plan.stages),
            engine=pb.EngineSettings(context_tokens=plan.context_tokens,
                                     max_sessions=plan.max_sessions,
                                     batch_tokens=plan.batch_tokens)))

    def _open_streams(self) -> None:
        first, last = self.clients[0], self.clients[-1]
        self._results_call = last.stub.Results(pb.ResultsRequest(pipeline_id=self.id),
                                               metadata=auth_metadata(self.token))
        threading.Thread(target=self._read_results, daemon=True).start()
        # The last stage announces the subscription with an empty message; until then a
        # result could be published to nobody.
        if not self._subscribed.wait(SUBSCRIBE_DEADLINE_S):
            raise self._broken or WorkerUnreachableError(
                last.address, f"results stream not open after {SUBSCRIBE_DEADLINE_S:.0f} s")

        def inputs() -> Iterator[pb.StageInput]:
            while (item := self._inputs.get()) is not None:
                yield item

        self._forward = first.stub.Forward.future(inputs(), metadata=auth_metadata(self.token))

    def _session_queue(self, session: str) -> queue.SimpleQueue:
        with self._lock:
            return self._results.setdefault(session, queue.SimpleQueue())

    def _read_results(self) -> None:
        try:
            for out in self._results_call:
                if not out.session:
                    self._subscribed.set()
                elif out.session_ended:
                    with self._lock:
                        self._results.pop(out.session, None)
                else:
                    self._session_queue(out.session).put(out)
            broken: Exception = WorkerUnreachableError(self.plan.stages[-1].worker,
                                                       "results stream ended")
        except grpc.RpcError as exc:
            broken = rpc_error(self.plan.stages[-1].worker, exc)
        with self._lock:
            self._broken = broken
            waiting = list(self._results.values())
        self._subscribed.set()
        for q in waiting:
            q.put(broken)

    # --- generation --------------------------------------------------------------------

    def _next_chunk(self) -> int:
        with self._lock:
            chunk, self._chunk = self._chunk, self._chunk + 1
        return chunk

    def _send(self, session: str, start: int, tokens: Sequence[int], want: bool,
              sampling: SamplingParams | None) -> int:
        chunk = self._next_chunk()
        msg = pb.StageInput(pipeline_id=self.id, session=session, chunk=chunk, start_pos=start,
                            tokens=list(tokens), want_token=want, sent_at=time.time())
        if sampling is not None:
            msg.sampling.CopyFrom(convert.sampling_to_proto(sampling))
        self._inputs.put(msg)
        return chunk

    def _wait(self, session: str, chunk: int, deadline_s: float) -> pb.StageOutput:
        """The result of ``chunk``; raises a typed error naming the failing worker."""
        give_up = time.monotonic() + deadline_s
        results = self._session_queue(session)
        while True:
            if self._broken is not None and results.empty():
                self.probe()
                raise self._broken
            try:
                out = results.get(timeout=POLL_S)
            except queue.Empty:
                self.probe()
                if time.monotonic() > give_up:
                    raise WorkerUnreachableError(
                        self.plan.stages[-1].worker,
                        f"no result after {deadline_s:.0f} s; every worker answers, so a stage "
                        f"is stuck: check the workers' logs") from None
                continue
            if isinstance(out, Exception):
                self.probe()
                raise out
            if out.HasField("error"):
                raise data_path_error(out.error)
            if out.chunk == chunk:
                return out

    def probe(self) -> None:
        """Raise for the first stage whose worker does not answer (named, with its layers)."""
        if self._alive_check is not None:
            try:
                self._alive_check()
            except WorkerUnreachableError as exc:
                stage = next((s for s in self.plan.stages if s.worker == exc.worker), None)
                if stage is None:
                    raise
                raise WorkerUnreachableError(
                    stage.worker, f"stage {stage.index} (layers {stage.layers}): "
                                  f"{str(exc).split(': ', 1)[-1]}") from None
        for stage, client in zip(self.plan.stages, self.clients, strict=True):
            try:
                info = client.info(deadline=2.0)
            except WorkerUnreachableError as exc:
                raise WorkerUnreachableError(
                    stage.worker, f"stage {stage.index} (layers {stage.layers}) stopped "
                                  f"answering: {exc}") from None
            if info.loaded.link_error:
                raise WorkerUnreachableError(
                    stage.worker, f"stage {stage.index} lost its link to the next stage: "
                                  f"{info.loaded.link_error}")
        if self._forward is not None and self._forward.done():
            raise rpc_error(self.plan.stages[0].worker, self._forward.exception()) \
                if isinstance(self._forward.exception(), grpc.RpcError) else \
                WorkerUnreachableError(self.plan.stages[0].worker, "input stream closed")

    def generate(self, session: str, prompt: Sequence[int], sampling: SamplingParams,
                 max_tokens: int, stats: StepStats | None = None,
                 step_deadline_s: float = 600.0) -> Iterator[int]:
        """Yield sampled token ids; the caller stops iterating at end-of-generation."""
        if not prompt:
            raise ValueError("empty prompt")
        stats = stats if stats is not None else StepStats()
        started = time.perf_counter()
        size = self.plan.batch_tokens
        chunks = [prompt[i:i + size] for i in range(0, len(prompt), size)]
        last = None
        for i, part in enumerate(chunks):  # all prompt chunks in flight at once
            last = self._send(session, i * size, part, want=i == len(chunks) - 1,
                              sampling=sampling if i == 0 else None)
        out = self._wait(session, last, step_deadline_s)
        stats.prompt_tokens += len(prompt)
        stats.prompt_s += time.perf_counter() - started
        stats.first_token_s = time.perf_counter() - started
        pos = len(prompt)
        for produced in range(max_tokens):
            token = out.token
            yield token
            if produced + 1 == max_tokens:
                break
            t0 = time.perf_counter()
            out = self._wait(session, self._send(session, pos, [token], True, None),
                             step_deadline_s)
            stats.decode_s += time.perf_counter() - t0
            stats.decode_tokens += 1
            stats.add_decode(out.timings)
            pos += 1

    def end_session(self, session: str) -> None:
        self._inputs.put(pb.StageInput(pipeline_id=self.id, session=session,
                                       chunk=self._next_chunk(), end_session=True))

    # --- lifetime ----------------------------------------------------------------------

    def close(self, unload: bool = True) -> None:
        self._inputs.put(None)
        if self._results_call is not None:
            self._results_call.cancel()
        for client in self.clients:
            if unload:
                try:
                    client.unload(self.id)
                except OrchError as exc:
                    log.debug("unload on %s: %s", client.address, exc)
            client.close()
