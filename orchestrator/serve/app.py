"""``orch serve``: an OpenAI-compatible HTTP API over a running model, and a small web page.

    /v1/models, /v1/chat/completions, /v1/completions   (SSE when "stream": true)
    /api/cluster                                         the plan and live speeds, for the page
    /                                                    the page: a chat box, the cluster

Each answer is one session of the pipeline. At most the plan's sessions run at once; up to
``serve_queue`` more requests wait for one, and beyond that a request gets 429. Generation
runs in a thread per answer (the session API is synchronous); a client that goes away
stops its answer within a token, which ends its session on the workers. An answer's place
is given back when its thread ends, after its session has ended on the workers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from importlib.resources import files
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchcore.errors import InvalidInputError, OrchError
from orchcore.sampling import SamplingParams
from orchestrator.pipeline.session import (
    Event,
    Failover,
    Finished,
    GenerationStats,
    RunningModel,
    TextPiece,
)
from orchestrator.settings import OrchSettings

log = logging.getLogger(__name__)

_FINISH = {"length": "length", "stop": "stop", "end": "stop"}  # ours -> OpenAI's


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send more than we use
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise InvalidInputError("stop: at most 4 non-empty strings")
        return stops

    def sampling(self, default: SamplingParams) -> SamplingParams:
        given = {"temperature": self.temperature, "top_p": self.top_p,
                 "seed": None if self.seed is None else self.seed % (1 << 32)}
        return replace(default, **{k: v for k, v in given.items() if v is not None})


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass
class Live:
    """What the page shows: answers in flight, and speeds as they are measured."""

    running: dict[str, GenerationStats] = field(default_factory=dict)
    last: GenerationStats | None = None
    answers: int = 0


class Gate:
    """At most ``slots`` answers at once; up to ``queue`` more wait; the rest get 429."""

    def __init__(self, slots: int, queue: int) -> None:
        self.slots, self.queue = slots, queue
        self.active = self.waiting = 0
        self._free = asyncio.Semaphore(slots)

    async def enter(self) -> None:
        if self._free.locked() and self.waiting >= self.queue:
            raise ApiError(429, f"all {self.slots} sessions are busy and {self.waiting} "
                                f"requests wait; try again shortly", "rate_limit_error")
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        self._free.release()


def create_app(model: RunningModel, name: str, settings: OrchSettings,
               on_broken: Callable[[str], None] | None = None) -> FastAPI:
    """The ASGI app serving ``model`` under ``name``. ``on_broken`` hears once that a worker
    of the pipeline is dead or hung and no failover could replace it (every later answer
    would fail: the caller stops). A failover that succeeds is only logged."""
    app = FastAPI(title="orch", docs_url=None, redoc_url=None)
    state = _State(model, name, settings, on_broken)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, str(exc), exc.kind)

    @app.exception_handler(ValidationError)
    async def bad_body(_request: Request, exc: ValidationError) -> JSONResponse:
        return _error(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                     for e in exc.errors()))

    @app.middleware("http")
    async def api_key(request: Request, call_next: Callable) -> Any:
        key = settings.api_key.get_secret_value() if settings.api_key else None
        if key and request.url.path.startswith(("/v1/", "/api/")):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), key.encode()):
                return _error(401, "missing or wrong API key (Authorization: Bearer KEY)",
                              "authentication_error")
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                            "owned_by": "orch"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = ChatRequest.model_validate(await _json(request))
        messages = [m.model_dump(include={"role", "content"}) for m in body.messages]
        return await state.answer(body, messages, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = CompletionRequest.model_validate(await _json(request))
        return await state.answer(body, body.prompt, chat=False)

    @app.get("/api/cluster")
    async def cluster() -> dict:
        return state.cluster()

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return files("orchestrator.serve").joinpath("web/index.html").read_text()

    return app


class _State:
    def __init__(self, model: RunningModel, name: str, settings: OrchSettings,
                 on_broken: Callable[[str], None] | None) -> None:
        self.model, self.name, self.settings = model, name, settings
        self.on_broken = on_broken
        self.gate = Gate(model.plan.max_sessions, settings.serve_queue)
        self.live = Live()

    async def answer(self, body: _Common, prompt: Any, *, chat: bool) -> Any:
        try:
            self.model.encode(prompt, chat=chat)  # a bad prompt is a 400, before any slot
            stops = body.stops()
            sampling = body.sampling(self.settings.sampling())
        except (OrchError, ValueError) as exc:  # empty, too long, not text, bad values
            raise ApiError(400, str(exc)) from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        await self.gate.enter()  # given back by the answer's thread as it ends
        try:
            running = self._start(prompt, sampling, stops, max_tokens, chat)
        except BaseException:
            self.gate.leave()
            raise
        events = self._events(running)
        kind = "chat.completion" if chat else "text_completion"
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(events, kind, usage),
                                     media_type="text/event-stream")
        text, done = [], None
        async with aclosing(events):
            async for event in events:
                if isinstance(event, TextPiece):
                    text.append(event.text)
                elif isinstance(event, Finished):
                    done = event
        assert done is not None  # generate always ends with Finished
        return _whole(kind, self.name, "".join(text), done)

    async def _sse(self, events: AsyncIterator[Event], kind: str, usage: bool
                   ) -> AsyncIterator[str]:
        ident, created = _ident(kind), int(time.time())
        try:  # closing the events (the client went away) stops the answer
            if kind == "chat.completion":
                yield _data(_chunk(kind, ident, created, self.name, {"role": "assistant",
                                                                      "content": ""}))
            async for event in events:
                if isinstance(event, TextPiece):
                    yield _data(_chunk(kind, ident, created, self.name, event.text))
                elif isinstance(event, Finished):
                    yield _data(_chunk(kind, ident, created, self.name, None,
                                       _FINISH[event.reason]))
                    if usage:
                        yield _data(_chunk(kind, ident, created, self.name, None, None,
                                           _usage(event)))
            yield "data: [DONE]\n\n"
        except (OrchError, ApiError) as exc:  # headers are out: the error goes in the stream
            yield _data({"error": {"message": str(exc), "type": getattr(exc, "kind",
                                                                        "server_error")}})
        finally:
            await events.aclose()

    def _start(self, prompt: Any, sampling: SamplingParams, stops: list[str],
               max_tokens: int | None, chat: bool) -> _Running:
        """Generate the answer in a thread, which gives the gate's place back when it ends:
        only then has the answer's session ended on the workers. (Given back when the
        client went away, the place could go to an answer whose session reaches the workers
        before the old one's end, and finds their sessions all taken.)"""
        loop, running = asyncio.get_running_loop(), _Running(asyncio.Queue(), threading.Event())
        key = uuid.uuid4().hex
        self.live.running[key] = running.stats

        def ended() -> None:  # on the event loop, once the session has ended
            self.gate.leave()
            del self.live.running[key]
            self.live.last, self.live.answers = running.stats, self.live.answers + 1

        gen = self.model.generate(prompt, sampling, stops=stops, max_tokens=max_tokens,
                                  chat=chat, stats=running.stats)
        threading.Thread(target=_pump, args=(gen, running, loop, ended), daemon=True,
                         name="answer").start()
        return running

    async def _events(self, running: _Running) -> AsyncIterator[Event]:
        """The answer's events; closing this iterator (the client went away) stops the
        answer within a token, and its thread then ends its session on the workers."""
        try:
            while (item := await running.queue.get()) is not _END:
                if isinstance(item, BaseException):
                    self._check_pipeline(item)
                    raise _api_error(item)
                if isinstance(item, Failover):  # the answer goes on; the client sees nothing
                    log.warning("%s", item.describe())
                    continue
                yield item
        finally:
            running.stop.set()

    def _check_pipeline(self, exc: BaseException) -> None:
        if self.model.path.failed and self.on_broken is not None:
            self.on_broken(f"{exc}")
            self.on_broken = None

    def cluster(self) -> dict:
        """The plan and each stage's speed (answers in flight first, else the last one)."""
        watched = next(iter(self.live.running.values()), None) or self.live.last
        stages = []
        for s in self.model.plan.stages:
            ms = (watched.compute_ms.get(s.index, 0.0) / watched.decode_tokens
                  if watched and watched.decode_tokens else None)
            stages.append({"index": s.index, "worker": s.worker, "host": s.device.hostname,
                           "layers": [s.layers.start, s.layers.end],
                           "compute_ms_per_token": ms,
                           "tokens_per_s": 1e3 / ms if ms else None})
        rate = (watched.decode_tokens / watched.decode_s
                if watched and watched.decode_s else None)
        return {"model": self.name, "layers": self.model.plan.n_layers, "stages": stages,
                "tokens_per_s": rate, "answers": self.live.answers,
                "sessions": {"slots": self.gate.slots, "active": self.gate.active,
                             "waiting": self.gate.waiting}}


_END = object()


@dataclass
class _Running:
    """An answer generated in a thread: its events (then ``_END``) arrive on ``queue``;
    setting ``stop`` ends it within a token."""

    queue: asyncio.Queue
    stop: threading.Event
    stats: GenerationStats = field(default_factory=GenerationStats)


def _pump(gen: Iterator[Event], running: _Running, loop: asyncio.AbstractEventLoop,
          ended: Callable[[], None]) -> None:
    """Run ``gen`` in this thread, handing its events to the event loop; ``ended`` runs
    there after the session has ended on the workers."""
    try:
        for event in gen:
            loop.call_soon_threadsafe(running.queue.put_nowait, event)
            if running.stop.is_set():
                break
    except BaseException as exc:  # handed to the request and raised there
        loop.call_soon_threadsafe(running.queue.put_nowait, exc)
    finally:
        gen.close()  # ends the session on the workers
        loop.call_soon_threadsafe(running.queue.put_nowait, _END)
        loop.call_soon_threadsafe(ended)


def _api_error(exc: BaseException) -> BaseException:
    if isinstance(exc, InvalidInputError):
        return ApiError(400, str(exc))
    if isinstance(exc, OrchError):
        return ApiError(503, str(exc), "server_error")
    return exc


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise ApiError(400, "the body is not JSON") from None


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": None}}, status_code=status)


def _ident(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]


def _usage(done: Finished) -> dict:
    completion = len(done.session.generated)
    return {"prompt_tokens": done.stats.prompt_tokens, "completion_tokens": completion,
            "total_tokens": done.stats.prompt_tokens + completion}


def _whole(kind: str, name: str, text: str, done: Finished) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": _FINISH[done.reason]}
    if kind == "chat.completion":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice |= {"text": text, "logprobs": None}
    return {"id": _ident(kind), "object": kind, "created": int(time.time()), "model": name,
            "choices": [choice], "usage": _usage(done)}


def _chunk(kind: str, ident: str, created: int, name: str, content: str | dict | None,
           finish: str | None = None, usage: dict | None = None) -> dict:
    if usage is not None:
        choices: list[dict] = []
    elif kind == "chat.completion":
        delta = content if isinstance(content, dict) else \
            ({} if content is None else {"content": content})
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": content or "", "logprobs": None,
                    "finish_reason": finish}]
    chunk = {"id": ident, "object": f"{kind}.chunk" if kind == "chat.completion" else kind,
             "created": created, "model": name, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

