"""An ASGI app of `orch serve` on a real HTTP server: uvicorn on a free loopback port, in a
thread, for as long as the ``with`` lasts."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from testkit.waiting import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app: Any, *, scheme: str = "http", log_level: str = "critical",
            **config: Any) -> Iterator[str]:
    """``app`` served by uvicorn on loopback, in a thread; its base URL. ``config``: more of
    uvicorn's settings (``ssl_certfile``, ``ssl_keyfile`` for HTTPS)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level=log_level, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), 30, "the server to start")
    assert server.started, "the server stopped before it started serving"
    try:
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
