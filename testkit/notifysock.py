"""A stand-in for systemd's end of the notify protocol: a datagram socket a worker is told
about in ``$NOTIFY_SOCKET``, and the messages it sent, each with the time it arrived."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple


class Message(NamedTuple):
    at: float  # time.monotonic() on arrival
    fields: dict[str, str]


class NotifySocket:
    """Bound to ``path``, or to an abstract name (``@...``) when ``path`` is None."""

    def __init__(self, path: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = f"orch-test-notify-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            self.sock.bind(str(path))
            self.env_value = str(path)
        self.messages: list[Message] = []

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def receive(self, timeout: float) -> Message | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        message = Message(time.monotonic(), fields)
        self.messages.append(message)
        return message

    def wait_for(self, wanted: Callable[[dict[str, str]], bool], timeout: float) -> Message:
        """The next message ``wanted`` accepts; fails after ``timeout`` seconds."""
        give_up = time.monotonic() + timeout
        while (left := give_up - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None and wanted(message.fields):
                return message
        raise AssertionError(f"no such notification within {timeout} s; got "
                             f"{[m.fields for m in self.messages]}")

    def collect(self, seconds: float) -> list[Message]:
        """Every message of the next ``seconds``."""
        got, until = [], time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            if (message := self.receive(left)) is not None:
                got.append(message)
        return got
