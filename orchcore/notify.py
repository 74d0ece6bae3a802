"""systemd's service notification protocol (``sd_notify``), spoken directly.

A service started with ``Type=notify`` is given ``$NOTIFY_SOCKET``, a datagram socket (a
path, or ``@name`` in the abstract namespace); it sends ``KEY=value`` lines there:
``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``. A watchdog is asked for with
``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the process it is meant for). No libsystemd;
without ``$NOTIFY_SOCKET`` every call does nothing, so a worker run by hand is unchanged.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

USEC = 1_000_000


def socket_address(value: str | None) -> str | None:
    """The address to send to: a path as is, ``@name`` as the abstract ``\\0name``; None
    for an unset or unusable value (systemd gives an absolute path or ``@``)."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    return value if value.startswith("/") else None


def watchdog_timeout_s(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog timeout systemd asks of process ``pid``, in seconds; None without one
    (unset, zero, unparsable, or meant for another process)."""
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / USEC if usec > 0 else None


def one_line(text: str) -> str:
    """A value fit for one ``KEY=value`` line."""
    return " ".join(text.split())


class Notifier:
    """Sends notifications to the service manager, or nothing when there is none."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._failed = False
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        environ = os.environ if environ is None else environ
        return cls(socket_address(environ.get("NOTIFY_SOCKET")))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines in one datagram (``send(READY=1, STATUS="...")``);
        whether it went out. A failure is logged once, never raised: a service manager
        that stops listening is no reason for the worker to stop."""
        if self._sock is None:
            return False
        message = "\n".join(f"{key}={one_line(str(value))}" for key, value in fields.items())
        try:
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify the service manager at %r: %s",
                            self.address.replace("\0", "@"), exc)
                self._failed = True
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
