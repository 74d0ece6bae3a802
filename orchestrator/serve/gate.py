"""Who may start an answer: at most the plan's sessions at once, a bounded queue behind them,
and errors in OpenAI's shape that tell a client when to come back."""

from __future__ import annotations

import asyncio
import math
import time


class ApiError(Exception):
    """An HTTP error in OpenAI's shape; ``retry_after`` (seconds) becomes Retry-After."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", *,
                 param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class Gate:
    """At most ``slots`` answers at once; up to ``queue`` more wait, each at most ``wait_s``;
    the rest get 429 with a Retry-After from the answers' recent lengths."""

    def __init__(self, slots: int, queue: int, wait_s: float = 30.0) -> None:
        self.slots, self.queue, self.wait_s = slots, queue, wait_s
        self.active = self.waiting = 0
        self._free = asyncio.Semaphore(slots)
        self._taking = asyncio.Lock()  # one request gathers its places at a time
        self._answer_s = 2.0  # a moving average of how long an answer holds its place

    def retry_after(self) -> int:
        """Seconds until a place is likely free for one more request."""
        return max(1, min(60, math.ceil(self._answer_s * (self.waiting + 1) / self.slots)))

    def busy(self) -> ApiError:
        return ApiError(429, f"all {self.slots} sessions are busy and {self.waiting} requests "
                             f"wait; try again in {self.retry_after()} s", "rate_limit_error",
                        code="busy", retry_after=self.retry_after())

    async def enter(self, places: int = 1) -> float:
        """Wait for ``places`` places (n answers to one request: a session each, taken
        together, one request at a time, so two cannot each hold part of what they need);
        returns when they were taken, for ``leave`` (once per place)."""
        if places > self.slots:
            raise ApiError(400, f"n={places} answers need {places} sessions at once; this "
                                f"server has {self.slots} (--max-sessions); ask for fewer",
                           param="n")
        if self._free.locked() and self.waiting >= self.queue:
            raise self.busy()
        self.waiting += 1
        try:
            await asyncio.wait_for(self._take(places), self.wait_s)
        except TimeoutError:
            raise self.busy() from None
        finally:
            self.waiting -= 1
        self.active += places
        return time.monotonic()

    async def _take(self, places: int) -> None:
        async with self._taking:
            held = 0
            try:
                while held < places:
                    await self._free.acquire()
                    held += 1
            except BaseException:  # timed out or the client left: give back what it held
                for _ in range(held):
                    self._free.release()
                raise

    def leave(self, since: float, places: int = 1) -> None:
        took = time.monotonic() - since
        self._answer_s = 0.8 * self._answer_s + 0.2 * took
        self.active -= places
        for _ in range(places):
            self._free.release()
