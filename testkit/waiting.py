"""Waiting for something another thread or process does: poll with a deadline, never
sleep a guessed time and then assert."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """What a test waited for did not happen in time (a failure of the test, not an error)."""


def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               interval: float = 0.05) -> T:
    """Call ``predicate`` until it returns a true value, and return that value.

    After ``timeout`` seconds raise ``WaitTimeout`` naming ``what`` was awaited and the
    last value seen. The predicate is always called at least once more at the deadline, so
    a slow machine that gets there just in time still passes.
    """
    give_up = time.monotonic() + timeout
    while True:
        last_call = time.monotonic() >= give_up
        value = predicate()
        if value:
            return value
        if last_call:
            raise WaitTimeout(f"waited {timeout:g} s for {what}; last saw {value!r}")
        time.sleep(min(interval, max(0.0, give_up - time.monotonic())))
