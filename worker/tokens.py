"""The cluster token a worker accepts, and its rotation.

A worker starts with the token it is given (``ORCH_WORKER_TOKEN``), unless a rotation left
a newer one in its state folder (``token``, mode 0600), which then wins. ``rotate`` makes a
new token current at once and keeps accepting the previous one for a grace period, so the
stages of a running pipeline, which call each other with the token, and the other workers
of the cluster, rotated a moment later, are not cut off mid-rotation.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from pathlib import Path

from orchcore import clustertoken
from orchcore.files import write_atomic

log = logging.getLogger(__name__)


class Tokens:
    def __init__(self, current: str | None, state_file: Path | None = None, *,
                 loopback: bool = False) -> None:
        self._current = current
        self._previous: tuple[str, float] | None = None  # (token, accepted until)
        self._state_file = state_file
        self._loopback = loopback  # the worker is bound to loopback (the token rule's case)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, given: str | None, state_dir: Path | None, *, loopback: bool = False
             ) -> Tokens:
        state_file = state_dir / "token" if state_dir is not None else None
        if state_file is not None and state_file.is_file():
            rotated = state_file.read_text().strip()
            if rotated:
                log.info("using the rotated cluster token kept in %s", state_file)
                return cls(rotated, state_file, loopback=loopback)
        return cls(given, state_file, loopback=loopback)

    @property
    def current(self) -> str | None:
        return self._current

    @property
    def previous(self) -> str | None:
        """The token before the last rotation, while it is still accepted."""
        with self._lock:
            previous = self._previous
        return previous[0] if previous is not None and time.monotonic() < previous[1] else None

    def accepts(self, given: str) -> bool:
        """Whether ``given`` (the bare token) is the current one, or the previous one within
        its grace period. No token set: everything is accepted."""
        with self._lock:
            current = self._current
        if current is None:
            return True
        if hmac.compare_digest(given.encode(), current.encode()):
            return True
        previous = self.previous
        return previous is not None and hmac.compare_digest(given.encode(), previous.encode())

    def rotate(self, new: str, grace_s: float) -> None:
        """Make ``new`` current (kept in the state folder); the old one is accepted for
        ``grace_s`` more seconds."""
        warning = clustertoken.require(new, loopback=self._loopback, source="the new token")
        if warning:
            log.warning("%s", warning)
        if self._state_file is not None:
            write_atomic(self._state_file, new + "\n", mode=0o600)
        with self._lock:
            if self._current is not None:
                self._previous = (self._current, time.monotonic() + grace_s)
            self._current = new
        log.info("cluster token rotated; the previous one is accepted for %.0f s more",
                 grace_s)
