"""``orch serve``: an OpenAI-compatible HTTP API over a running model, and a small web page.

    /v1/models, /v1/chat/completions, /v1/completions   (SSE when "stream": true)
    /api/cluster                                         the plan and live speeds, for the page
    /metrics                                             Prometheus' text format (``metrics``)
    /                                                    the page: a chat box, the cluster

A request passes the API key and the body limit (``guard``), its fields are read strictly
(``openai``: a field orch cannot honour is a 400, never ignored), its prompt is tokenized in
a thread, and then it waits for a place (``gate``): at most the plan's sessions answer at
once, a bounded queue waits behind them, the rest get 429 with Retry-After. Each answer is
one session of the pipeline, generated in a thread (the session API is synchronous). A
client that goes away, streaming or not, stops its answer within a token, which ends its
session on the workers; its place is given back once that session has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from orchcore.errors import ContextFullError, InvalidInputError, OrchError
from orchestrator.pipeline.session import (
    Event,
    Failover,
    Finished,
    GenerationStats,
    RunningModel,
    Session,
    TextPiece,
    check_prompt,
)
from orchestrator.serve import legacy, replies
from orchestrator.serve.answering import (
    END,
    Running,
    collect,
    pump,
    relay,
    seeded,
    stop_when_gone,
    unless_gone,
)
from orchestrator.serve.embeddings import EmbeddingRequest, normalized, parse_embeddings
from orchestrator.serve.embeddings import reply as embedding_reply
from orchestrator.serve.gate import ApiError, Gate
from orchestrator.serve.guard import ApiKeyGuard, read_json
from orchestrator.serve.health import HealthWatch
from orchestrator.serve.metrics import CountRequests, Metrics
from orchestrator.serve.openai import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    parse_chat,
    parse_completion,
)
from orchestrator.serve.shaping import (
    PLAIN,
    Collected,
    Shape,
    chat_message,
    logprob_content,
    logprobs_of,
    shape_chat,
    tool_calls,
)
from orchestrator.settings import OrchSettings

log = logging.getLogger(__name__)

_PATHS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
          "/api/cluster", "/metrics", "/")
HEALTH_EVERY_S = 1.0  # how often the page's view asks each stage's worker how it is


@dataclass
class Live:
    """What the page shows: answers in flight, and speeds as they are measured."""

    running: dict[str, GenerationStats] = field(default_factory=dict)
    last: GenerationStats | None = None
    answers: int = 0


def create_app(model: RunningModel, name: str, settings: OrchSettings,
               on_broken: Callable[[str], None] | None = None,
               aliases: Sequence[str] = ()) -> FastAPI:
    """The ASGI app serving ``model`` under ``name`` (and ``aliases``). ``on_broken`` hears
    once that a worker of the pipeline is dead or hung and no failover could replace it
    (every later answer would fail: the caller stops). A failover that succeeds is only
    logged."""
    key = settings.api_key.get_secret_value() if settings.api_key else None
    state = _State(model, (name, *dict.fromkeys(a for a in aliases if a != name)), settings,
                   on_broken)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        watching = asyncio.create_task(state.health.watch())
        try:
            yield
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching

    app = FastAPI(title="orch", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.add_middleware(ApiKeyGuard, key=key)
    app.add_middleware(CountRequests, metrics=state.metrics, paths=_PATHS)  # outermost: 401s too
    limit = settings.serve_max_body_bytes

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestError)
    async def refused(_request: Request, exc: RequestError) -> JSONResponse:
        return await api_error(_request, ApiError(400, str(exc), param=exc.param))

    @app.exception_handler(ValidationError)
    async def bad_body(_request: Request, exc: ValidationError) -> JSONResponse:
        return await api_error(_request, replies.invalid(exc))

    @app.exception_handler(Exception)
    async def crashed(_request: Request, exc: Exception) -> JSONResponse:
        ident = uuid.uuid4().hex[:12]
        log.error("request %s failed", ident, exc_info=exc)
        return await api_error(_request, ApiError(
            500, f"the server failed on this request (error {ident} in its log)",
            "server_error"))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0,
                                            "owned_by": "orch"} for n in state.names]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = parse_chat(await read_json(request, limit))
        shape = shape_chat(body, state.model.tokenizer.chat_template)
        return await state.answer(request, body, body.chat(), chat=True, shape=shape)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = parse_completion(await read_json(request, limit))
        return await state.answer(request, body, body.one_prompt(), chat=False)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        return await state.embed(parse_embeddings(await read_json(request, limit)))

    @app.get("/api/cluster")
    async def cluster() -> dict:
        return state.cluster()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return files("orchestrator.serve").joinpath("web/index.html").read_text()

    return app


class _State:
    def __init__(self, model: RunningModel, names: tuple[str, ...], settings: OrchSettings,
                 on_broken: Callable[[str], None] | None) -> None:
        self.model, self.names, self.settings = model, names, settings
        self.on_broken = on_broken
        self.gate = Gate(model.plan.max_sessions, settings.serve_queue,
                         settings.serve_queue_wait_s)
        self.live = Live()
        self.metrics = Metrics(model, lambda: self.gate.active, lambda: self.gate.waiting)
        self.health = HealthWatch(model, HEALTH_EVERY_S, settings.probe_deadline_s)

    def check_model(self, model: str | None) -> str:
        """The name a request asked for (404 if it is not served here)."""
        if model is not None and model not in self.names:
            raise ApiError(404, f"model {model!r} is not served here; this server serves "
                                f"{', '.join(self.names)}", param="model",
                           code="model_not_found")
        return model or self.names[0]

    async def answer(self, request: Request, body: ChatRequest | CompletionRequest,
                     prompt: Any, *, chat: bool, shape: Shape = PLAIN) -> Any:
        """``n`` answers to one prompt: prefilled once, a session and a place each."""
        name, n = self.check_model(body.model), body.answers()
        stops, sampling = body.stops(), shape.sampling(body.sampling(self.settings.sampling()))
        if not chat and body.logprobs is not None:  # the legacy shape
            sampling = replace(sampling, logprobs=True, top_logprobs=body.logprobs)
        tokens = await asyncio.to_thread(self._encode, prompt, chat, shape)
        # Greedy answers to one prompt are one answer: it is generated once and given n
        # times (n sessions would only race to the same tokens, and batched together they
        # may part at a near-tie). Its places at the gate are taken, and the others given
        # back once it runs.
        runs = 1 if sampling.greedy else n
        sessions = self.model.fork(tokens, seeded(sampling, runs),
                                   score_prompt=not chat and body.scores())
        since = await unless_gone(request, self.gate.enter(n),
                                   lambda t: self.gate.leave(t, n))
        started: list[Running] = []
        try:
            for session in sessions:
                started.append(self._start(tokens, session, stops, body.limit(), since,
                                           special=shape.fmt is not None))
            if runs < n:
                self.gate.leave(since, n - runs)
        except BaseException:
            self.gate.leave(since, n - len(started))
            for running in started:
                running.stop.set()
            raise
        kind = "chat.completion" if chat else "text_completion"
        echo = "" if chat or not body.echo else legacy.echoed(self.model.tokenizer, prompt,
                                                               tokens)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(self._events(started[0]), kind, name, usage,
                                               shape, echo),
                                     media_type="text/event-stream")
        answers = await self._collect_all(request, started)
        if answers is None:  # the client went away: nobody reads this
            return Response(status_code=499)
        answers = answers * (n // runs)  # a greedy answer, given n times
        if chat:
            return replies.whole(kind, name, [self._chat_choice(i, c, d, shape)
                                              for i, (c, d) in enumerate(answers)],
                                 [d for _, d in answers])
        rows = answers[0][1].session.prompt_scores  # the prompt was scored once, by the first
        return replies.whole(kind, name, [
            replies.choice(kind, i, echo + "".join(c.text), d, logprobs=None
                           if body.logprobs is None else legacy.logprobs(
                               self.model.tokenizer, d, tokens, rows, echo=bool(body.echo),
                               start=0 if body.echo else len(legacy.echoed(
                                   self.model.tokenizer, prompt, tokens))))
            for i, (c, d) in enumerate(answers)], [d for _, d in answers])

    async def _collect_all(self, request: Request, started: list[Running]
                           ) -> list[tuple[Collected, Finished]] | None:
        """Every answer whole, in order; None if the client went away (which stops them)."""
        stop = threading.Event()
        watcher = asyncio.create_task(stop_when_gone(request, stop))
        relaying = asyncio.create_task(relay(stop, [r.stop for r in started]))
        try:
            answers = await asyncio.gather(*(collect(self._events(r), self.model.tokenizer)
                                              for r in started))
        except BaseException:
            stop.set()  # one failed: the others stop too
            raise
        finally:
            watcher.cancel()
            relaying.cancel()
        if any(done is None for _, done in answers):
            return None
        return answers  # type: ignore[return-value]

    def _chat_choice(self, index: int, collected: Collected, done: Finished,
                     shape: Shape) -> dict:
        message, called = chat_message("".join(collected.text), shape)
        return replies.choice("chat.completion", index, "", done, message=message,
                              finish="tool_calls" if called else None,
                              logprobs=logprobs_of(collected.logprobs) if shape.logprobs
                              else None)

    async def embed(self, body: EmbeddingRequest) -> dict:
        """Each input's pooled, normalized final hidden state; a place in the gate each in
        turn (an input is one short session)."""
        name, inputs = self.check_model(body.model), body.inputs()
        vectors, used = [], 0
        for item in inputs:
            tokens = await asyncio.to_thread(self._encode, item, False, PLAIN)
            since = await self.gate.enter()
            try:
                vector = await asyncio.to_thread(self.model.embed, tokens)
            except OrchError as exc:
                self._check_pipeline(exc)
                raise self._api_error(exc) from None
            finally:
                self.gate.leave(since)
            body.check_dimensions(len(vector))
            vectors.append(normalized(vector))
            used += len(tokens)
        return embedding_reply(name, vectors, body.encoding_format, used)

    def _encode(self, prompt: Any, chat: bool, shape: Shape) -> list[int]:
        """Token ids of the prompt, or a 400 saying what is wrong with it (in a thread: a
        long prompt never holds up the event loop)."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            bad = next((t for t in prompt if not 0 <= t < self.model.tokenizer.n_vocab), None)
            if bad is not None:
                raise ApiError(400, f"token id {bad} is outside the vocabulary [0, "
                                    f"{self.model.tokenizer.n_vocab})", param="prompt")
        try:
            if shape.tools is None:
                return self.model.encode(prompt, chat=chat)
            tokens = self.model.tokenizer.encode_chat(prompt, tools=shape.tools)
            check_prompt(tokens, self.model.plan.context_tokens)
            return tokens
        except ContextFullError:
            raise ApiError(400, f"the prompt is longer than this server's context of "
                                f"{self.model.plan.context_tokens} tokens; shorten it (or the "
                                f"conversation)", param="messages" if chat else "prompt",
                           code="context_length_exceeded") from None
        except (OrchError, ValueError) as exc:  # empty, not text, the template refused it
            raise ApiError(400, str(exc), param="messages" if chat else "prompt") from None

    async def _sse(self, events: AsyncIterator[Event], kind: str, name: str, usage: bool,
                   shape: Shape, echo: str = "") -> AsyncIterator[str]:
        ident, created = replies.ident(kind), int(time.time())
        watch = shape.watch()

        def chunk(content: str | dict | None, finish: str | None = None,
                  totals: dict | None = None, logprobs: dict | None = None) -> str:
            return replies.data(replies.chunk(kind, ident, created, name, content, finish,
                                              totals, logprobs))

        try:  # closing the events (the client went away) stops the answer
            if kind == "chat.completion":
                yield chunk({"role": "assistant", "content": ""})
            elif echo:
                yield chunk(echo)
            async for event in events:
                if isinstance(event, TextPiece):
                    text = watch.feed(event.text) if watch else event.text
                    scores = logprobs_of(logprob_content(self.model.tokenizer, event)) \
                        if shape.logprobs else None
                    if text or scores:
                        yield chunk(text, logprobs=scores)
                elif isinstance(event, Finished):
                    finish = replies.FINISH[event.reason]
                    if watch is not None:
                        tail, calls = watch.finish()
                        if tail:
                            yield chunk(tail)
                        if calls:
                            yield chunk({"tool_calls": tool_calls(calls, streamed=True)})
                            finish = "tool_calls"
                    yield chunk(None, finish)
                    if usage:
                        yield chunk(None, None, replies.usage(event))
            yield "data: [DONE]\n\n"
        except ApiError as exc:  # headers are out: the error goes in the stream
            yield replies.data(exc.body())
        finally:
            await events.aclose()

    def _start(self, tokens: list[int], session: Session, stops: list[str],
               max_tokens: int | None, since: float, special: bool = False) -> Running:
        """Generate the answer in a thread, which gives the gate's place back when it ends:
        only then has the answer's session ended on the workers. (Given back when the
        client went away, the place could go to an answer whose session reaches the workers
        before the old one's end, and finds their sessions all taken.)"""
        loop, running = asyncio.get_running_loop(), Running(asyncio.Queue(), threading.Event())
        key = uuid.uuid4().hex
        self.live.running[key] = running.stats

        def ended() -> None:  # on the event loop, once the session has ended
            self.gate.leave(since)
            del self.live.running[key]
            self.live.last, self.live.answers = running.stats, self.live.answers + 1
            self.metrics.answered(running.stats)

        gen = self.model.generate(tokens, stops=stops, max_tokens=max_tokens, chat=False,
                                  stats=running.stats, special=special, session=session)
        threading.Thread(target=pump, args=(gen, running, loop, ended), daemon=True,
                         name="answer").start()
        return running

    async def _events(self, running: Running) -> AsyncIterator[Event]:
        """The answer's events; closing this iterator (the client went away) stops the
        answer within a token, and its thread then ends its session on the workers."""
        try:
            while (item := await running.queue.get()) is not END:
                if isinstance(item, BaseException):
                    self._check_pipeline(item)
                    raise self._api_error(item)
                if isinstance(item, Failover):  # the answer goes on; the client sees nothing
                    log.warning("%s", item.describe())
                    self.metrics.failovers.inc()
                    continue
                yield item
        finally:
            running.stop.set()

    def _api_error(self, exc: BaseException) -> BaseException:
        """What the client is told: the cause goes to the log, not to the client."""
        if isinstance(exc, InvalidInputError):
            return ApiError(400, str(exc))
        if not isinstance(exc, OrchError):
            return exc
        ident = uuid.uuid4().hex[:12]
        log.error("answer %s failed: %s", ident, exc)
        return ApiError(503, f"the cluster could not finish this answer: a worker failed or "
                             f"stopped answering (error {ident} in the server's log); try "
                             f"again shortly", "server_error",
                        code="cluster_unavailable", retry_after=self.gate.retry_after())

    def _check_pipeline(self, exc: BaseException) -> None:
        if self.model.path.failed and self.on_broken is not None:
            self.on_broken(f"{exc}")
            self.on_broken = None

    def cluster(self) -> dict:
        """The plan; each stage's health, memory, codec to the next stage, and speed
        (answers in flight first, else the last one) with what its speculation kept; the
        context and answer lengths."""
        watched = next(iter(self.live.running.values()), None) or self.live.last
        plan, stages = self.model.plan, []
        for s in plan.stages:
            ms = (watched.compute_ms.get(s.index, 0.0) / watched.decode_tokens
                  if watched and watched.decode_tokens else None)
            health = self.health.of(s.worker)
            stages.append({"index": s.index, "worker": s.worker, "host": s.device.hostname,
                           "layers": [s.layers.start, s.layers.end],
                           "health": health.state,
                           "memory_bytes": health.resident_bytes or s.memory.total,
                           "budget_bytes": s.budget,
                           "codec": plan.codec if s.index + 1 < len(plan.stages) else None,
                           "compute_ms_per_token": ms,
                           "tokens_per_s": 1e3 / ms if ms else None})
        rate = (watched.decode_tokens / watched.decode_s
                if watched and watched.decode_s else None)
        speculation = (watched.speculation.summary(
            self.model.settings.speculate, watched.decode_tokens, watched.decode_s,
            self.model.speculator.costs)
            if watched and self.model.speculator.mode.on and watched.speculation.passes
            else None)
        return {"model": self.names[0], "layers": plan.n_layers, "stages": stages,
                "tokens_per_s": rate, "speculation": speculation, "answers": self.live.answers,
                "context_tokens": plan.context_tokens, "max_tokens": self.settings.max_tokens,
                "sessions": {"slots": self.gate.slots, "active": self.gate.active,
                             "waiting": self.gate.waiting}}
