"""`orch publish`'s wheel folder served for tests, under a LAN-like name.

``orch image`` refuses a loopback ``--wheels-url`` (a Pi cannot reach it), and tests may
only talk to loopback. So the real publish server listens on loopback and is named
``http://wheels.orch.test:PORT/`` (``.test`` is reserved: it never resolves); the
processes under test reach it through the ``http_proxy`` variables of ``env``, pointing at
that same server (HTTP/1.1 servers accept a proxy's absolute request targets). No name is
looked up and nothing leaves loopback.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.pi.publish import gather, make_server

HOST = "wheels.orch.test"


@contextmanager
def published_wheels(folder: Path, extra: Iterable[Path] = (), *, build_orch: bool = False
                     ) -> Iterator[tuple[str, dict[str, str]]]:
    """(the wheels URL, the environment that reaches it). ``build_orch``: orch's wheel built
    from this checkout, as `orch publish` does; else a stand-in file under its name
    (nothing here installs it)."""
    orch_wheel = None
    if not build_orch:
        orch_wheel = folder.parent / f"{folder.name}-orch" / "orch_cluster-0.1.0-py3-none-any.whl"
        orch_wheel.parent.mkdir(parents=True, exist_ok=True)
        orch_wheel.write_bytes(b"a stand-in for orch's wheel")
    gather(folder, orch_wheel, extra)
    server = make_server(folder, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    proxy = f"http://127.0.0.1:{port}"
    direct = "127.0.0.1,localhost,::1"  # loopback URLs are not sent through it
    env = {"http_proxy": proxy, "HTTP_PROXY": proxy, "no_proxy": direct, "NO_PROXY": direct}
    try:
        yield f"http://{HOST}:{port}/", env
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
