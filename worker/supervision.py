"""What the worker tells systemd: ``READY=1`` once it serves, ``STATUS=`` when its stage
changes, ``WATCHDOG=1`` while its gRPC server answers a health check of its own.

"Wedged" here means the server no longer answers calls: its thread pool held by stuck
streams, its transport dead, the process frozen. A long computation is not wedged: the
stage computes on a thread of its own, so a minutes-long prefill on a Raspberry Pi leaves
the server answering. A thread of this module therefore calls the worker's own ``Ping``
through the real server (listening socket, token check, RPC thread pool) every third of
the watchdog timeout, and feeds the watchdog only when it answered in time: two failed
checks in a row and systemd kills the worker, and ``Restart=on-failure`` starts it again.

Without ``$NOTIFY_SOCKET`` (a worker run by hand, by ``orch run`` or by tests) nothing here
runs: no thread, no check.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping

import grpc

from orchcore.errors import WorkerUnreachableError
from orchcore.notify import USEC, Notifier, watchdog_timeout_s
from orchcore.wire.channel import open_channel, ping

log = logging.getLogger(__name__)

CHECKS_PER_TIMEOUT = 3  # a check every third of the timeout: one late answer is ridden out
STATUS_EVERY_S = 1.0  # how often the status line is recomputed (sent only when it changed)
READY_CHECK_S = 10.0  # the first check, before READY=1: the server has just started


class SelfCheck:
    """A ``Ping`` to this worker's own server, over a channel opened by the first check
    and kept open."""

    def __init__(self, address: str, token: Callable[[], str | None],
                 certificate: bytes | None = None) -> None:
        self.address = address
        self._token = token  # read at each check: the token may be rotated
        self._certificate = certificate  # its own: nothing to prove to itself
        self._channel: grpc.Channel | None = None

    def __call__(self, deadline_s: float) -> str | None:
        """None if the server answered within ``deadline_s``, else what went wrong."""
        if self._channel is None:
            self._channel = open_channel(self.address, self._certificate)
        try:
            ping(self._channel, self._token(), deadline_s, wait_for_ready=True)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


class Supervision:
    """The notifications of one worker process; does nothing without a service manager."""

    def __init__(self, notifier: Notifier, check: Callable[[float], str | None],
                 status: Callable[[], str], timeout_s: float | None = None,
                 floor_s: float = 30.0) -> None:
        self.notifier = notifier
        self._check = check
        self._status = status
        self.requested_s = timeout_s  # the watchdog timeout systemd asked for, if any
        self.timeout_s = None if timeout_s is None else max(timeout_s, floor_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_status = ""

    @classmethod
    def from_environ(cls, check: Callable[[float], str | None], status: Callable[[], str],
                     floor_s: float, environ: Mapping[str, str] | None = None
                     ) -> Supervision:
        environ = os.environ if environ is None else environ
        return cls(Notifier.from_environ(environ), check, status,
                   watchdog_timeout_s(environ, os.getpid()), floor_s)

    @property
    def interval_s(self) -> float | None:
        """How often the watchdog is fed; None without a watchdog."""
        return None if self.timeout_s is None else self.timeout_s / CHECKS_PER_TIMEOUT

    def ready(self) -> None:
        """Check that the server answers, then send ``READY=1`` (with the first status and
        watchdog ping) and start the thread. Raises if the server does not answer."""
        if not self.notifier.enabled:
            return
        problem = self._check(READY_CHECK_S)
        if problem is not None:
            raise WorkerUnreachableError("this worker", f"its own server does not answer "
                                         f"({problem}); not telling systemd it is ready")
        self._last_status = self._status()
        fields: dict[str, str | int] = {"READY": 1, "STATUS": self._last_status}
        if self.timeout_s is not None:
            if self.timeout_s != self.requested_s:  # raise systemd's timeout to our floor
                fields["WATCHDOG_USEC"] = round(self.timeout_s * USEC)
                log.info("watchdog timeout raised from %.3g s to %.3g s (the floor, "
                         "--watchdog-floor-s)", self.requested_s, self.timeout_s)
            fields["WATCHDOG"] = 1
        self.notifier.send(**fields)
        self._thread = threading.Thread(target=self._run, name="supervision", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self.interval_s
        next_check = time.monotonic() + (interval or 0.0)
        failures = 0
        while True:
            wait = STATUS_EVERY_S if interval is None else \
                min(STATUS_EVERY_S, max(0.0, next_check - time.monotonic()))
            if self._stop.wait(wait):
                return
            self._send_status()
            if interval is None or time.monotonic() < next_check:
                continue
            problem = self._check(interval / 2)
            if self._stop.is_set():
                return
            if problem is None:
                failures = 0
                self.notifier.send(WATCHDOG=1)
            else:
                failures += 1
                log.warning("health check %d failed: %s (the watchdog is not fed; systemd "
                            "restarts the worker %.3g s after the last good check)", failures,
                            problem, self.timeout_s)
            next_check = max(next_check + interval, time.monotonic())

    def _send_status(self) -> None:
        status = self._status()
        if status != self._last_status:
            self._last_status = status
            self.notifier.send(STATUS=status)

    def close(self) -> None:
        """Stop the thread and tell systemd the worker is stopping."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.notifier.send(STOPPING=1, STATUS="stopping")
        self.notifier.close()
