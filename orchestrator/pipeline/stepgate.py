"""Steps of many answers at once, or a failover alone: a step holds the gate shared and
records its token inside it; a failover holds it exclusively, so it sees every session
between steps."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class StepGate:
    """Steps hold it shared (many at once); a failover holds it alone."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._steps = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._steps += 1
        try:
            yield
        finally:
            with self._cond:
                self._steps -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            self._cond.wait_for(lambda: self._steps == 0)
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
