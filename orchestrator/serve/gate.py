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
        self._answer_s = 2.0  # a moving average of how long an answer holds its place

    def retry_after(self) -> int:
        """Seconds until a place is likely free for one more request."""
        return max(1, min(60, math.ceil(self._answer_s * (self.waiting + 1) / self.slots)))

    def busy(self) -> ApiError:
        return ApiError(429, f"all {self.slots} sessions are busy and {self.waiting} requests "
                             f"wait; try again in {self.retry_after()} s", "rate_limit_error",
                        code="busy", retry_after=self.retry_after())

    async def enter(self) -> float:
        """Wait for a place; returns when it was taken, for ``leave``."""
        if self._free.locked() and self.waiting >= self.queue:
            raise self.busy()
        self.waiting += 1
        try:
            await asyncio.wait_for(self._free.acquire(), self.wait_s)
        except TimeoutError:
            raise self.busy() from None
        finally:
            self.waiting -= 1
        self.active += 1
        return time.monotonic()

    def leave(self, since: float) -> None:
        took = time.monotonic() - since
        self._answer_s = 0.8 * self._answer_s + 0.2 * took
        self.active -= 1
        self._free.release()
