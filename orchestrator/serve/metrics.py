"""``/metrics`` of orch serve, in Prometheus' text format: requests, tokens, latencies,
the gate, the stages and the workers.

Each app has a registry of its own (two servers in one process do not mix their counts).
Gauges of the gate and the workers are read when scraped; answers are recorded once, when
their session has ended."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from orchestrator.pipeline.session import GenerationStats, RunningModel
from orchestrator.serve.guard import ASGIApp, Receive, Scope, Send

_LATENCY_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_PER_TOKEN_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, model: RunningModel, active: Callable[[], int],
                 waiting: Callable[[], int]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("orch_requests", "HTTP requests by path and status",
                                ["path", "status"], registry=r)
        self.prompt_tokens = Counter("orch_prompt_tokens", "Prompt tokens of answers",
                                     registry=r)
        self.completion_tokens = Counter("orch_completion_tokens", "Tokens generated",
                                         registry=r)
        self.first_token = Histogram("orch_time_to_first_token_seconds", "From the answer's "
                                     "start to its first token", buckets=_LATENCY_S, registry=r)
        self.per_token = Histogram("orch_time_per_output_token_seconds", "An answer's mean "
                                   "time per token after the first", buckets=_PER_TOKEN_S,
                                   registry=r)
        self.stage_compute = Counter("orch_stage_compute_seconds", "Compute time of each "
                                     "stage in decode steps", ["stage", "worker"], registry=r)
        self.drafted = Counter("orch_speculation_drafted_tokens", "Drafted tokens sent for "
                               "verification", registry=r)
        self.accepted = Counter("orch_speculation_accepted_tokens", "Drafted tokens the "
                                "verdicts kept", registry=r)
        self.passes = Counter("orch_speculation_passes", "Decode passes of speculating "
                              "answers, and those sent ahead that overlapped the pass before",
                              ["overlapped"], registry=r)
        self.failovers = Counter("orch_failovers", "Answers that went on after a worker "
                                 "failed", registry=r)
        Gauge("orch_queue_depth", "Requests waiting for a session",
              registry=r).set_function(waiting)
        Gauge("orch_active_sessions", "Answers being generated",
              registry=r).set_function(active)
        Gauge("orch_workers_up", "Workers of the plan that have not failed",
              registry=r).set_function(lambda: sum(
                  s.worker not in model.path.failed for s in model.plan.stages))
        self._model = model

    def answered(self, stats: GenerationStats) -> None:
        """Record an answer whose session has ended."""
        produced = stats.decode_tokens + (stats.first_token_s > 0)
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.completion_tokens.inc(produced)
        if produced:
            self.first_token.observe(stats.first_token_s)
        if stats.decode_tokens:
            self.per_token.observe(stats.decode_s / stats.decode_tokens)
        spec = stats.speculation
        if spec.drafted:
            self.drafted.inc(spec.drafted)
            self.accepted.inc(spec.accepted)
            self.passes.labels("yes").inc(spec.overlapped)
            self.passes.labels("no").inc(spec.passes - spec.overlapped)
        workers = {s.index: s.worker for s in self._model.plan.stages}
        for stage, ms in stats.compute_ms.items():
            self.stage_compute.labels(str(stage), workers.get(stage, "?")).inc(ms / 1e3)


class CountRequests:
    """ASGI middleware: each HTTP response counted by path and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: tuple[str, ...]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in self.paths else "other"

        async def counted(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
