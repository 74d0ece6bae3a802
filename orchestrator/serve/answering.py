"""Answers generated in threads for the event loop, and the client watched meanwhile: a
client that goes away stops its answers, or gives up its place in the queue."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request

from orchcore.sampling import RANDOM_SEED, SamplingParams
from orchestrator.pipeline.session import Event, Finished, GenerationStats, TextPiece
from orchestrator.serve.gate import ApiError
from orchestrator.serve.shaping import Collected
from orchestrator.text.tokenizer import Tokenizer

DISCONNECT_POLL_S = 0.2  # how often a waiting or non-streamed request checks its client

END = object()  # after an answer's last event


@dataclass
class Running:
    """An answer generated in a thread: its events (then ``END``) arrive on ``queue``;
    setting ``stop`` ends it within a token."""

    queue: asyncio.Queue
    stop: threading.Event
    stats: GenerationStats = field(default_factory=GenerationStats)


def pump(gen: Iterator[Event], running: Running, loop: asyncio.AbstractEventLoop,
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
        loop.call_soon_threadsafe(running.queue.put_nowait, END)
        loop.call_soon_threadsafe(ended)


async def collect(events: AsyncIterator[Event], tokenizer: Tokenizer
                   ) -> tuple[Collected, Finished | None]:
    collected, done = Collected(), None
    async with aclosing(events):
        async for event in events:
            if isinstance(event, TextPiece):
                collected.add(tokenizer, event)
            elif isinstance(event, Finished):
                done = event
    return collected, done


def seeded(sampling: SamplingParams, n: int) -> list[SamplingParams]:
    """The sampling parameters of n answers: the seed given, then the next ones (a random
    seed is drawn for each answer)."""
    if sampling.seed == RANDOM_SEED:
        return [sampling] * n
    return [replace(sampling, seed=(sampling.seed + i) % RANDOM_SEED) for i in range(n)]


async def relay(stop: threading.Event, stops: list[threading.Event]) -> None:
    """Once ``stop`` is set (the client went away), stop every answer."""
    while not stop.is_set():
        await asyncio.sleep(DISCONNECT_POLL_S)
    for each in stops:
        each.set()


async def went_away(request: Request) -> None:
    """Returns once the client has gone away."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


async def stop_when_gone(request: Request, stop: threading.Event) -> None:
    await went_away(request)
    stop.set()


async def unless_gone(request: Request, entering: Any, leave: Callable[[float], None]
                       ) -> float:
    """Wait for a place in the gate, unless the client goes away first (then its place in
    the queue is given up, and a place it got meanwhile is given back)."""
    enter, gone = asyncio.ensure_future(entering), asyncio.ensure_future(went_away(request))
    try:
        await asyncio.wait({enter, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not enter.done():
            enter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                leave(await enter)  # got a place as the client left
    if enter.cancelled():
        raise ApiError(499, "the client went away while waiting")
    return enter.result()
