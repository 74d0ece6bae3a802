"""``orch serve``: the OpenAI-compatible server over a deployed model."""

from __future__ import annotations

from typing import Annotated

import typer

from orchcore.errors import InvalidSettingError, OrchError
from orchestrator.cli.app import app, err, fail, setting_option, setup_logging
from orchestrator.settings import OrchSettings, parse_workers


@app.command()
def serve(
    model: Annotated[str, typer.Argument(
        help="A .gguf file, a known name, an https:// URL or hf://OWNER/REPO/FILE.gguf.")],
    workers: Annotated[str | None, typer.Option(
        help="Workers as HOST:PORT,HOST:PORT, or @FILE; without it, the workers found on the "
             "LAN, else local worker processes.")] = None,
    local: Annotated[int | None, setting_option("local_workers", "--local")] = None,
    host: Annotated[str | None, setting_option("serve_host", "--host")] = None,
    port: Annotated[int | None, setting_option("serve_port", "--port")] = None,
    queue: Annotated[int | None, setting_option("serve_queue", "--queue")] = None,
    context: Annotated[int | None, setting_option("context_tokens", "--context")] = None,
    max_sessions: Annotated[int | None, setting_option("max_sessions", "--max-sessions")] = None,
    max_tokens: Annotated[int | None, setting_option("max_tokens", "--max-tokens")] = None,
    threads: Annotated[int | None, setting_option("threads", "--threads")] = None,
    codec: Annotated[str | None, setting_option("codec", "--codec")] = None,
    speculate: Annotated[str | None, setting_option("speculate", "--speculate")] = None,
    force: Annotated[bool, typer.Option(
        help="Take over workers that run another orchestrator's model.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions,
    /v1/completions, /v1/models), with a chat page and the cluster at /.

    The API key comes from ORCH_API_KEY (never a flag: command lines are visible to other
    users). Concurrent requests share the pipeline up to --max-sessions; --queue more wait.
    """
    setup_logging(verbose)
    from contextlib import ExitStack

    import uvicorn

    from orchestrator.cli.running import open_model
    from orchestrator.serve.app import create_app

    try:
        settings = OrchSettings.load(local_workers=local, serve_host=host, serve_port=port,
                                     serve_queue=queue, context_tokens=context,
                                     max_sessions=max_sessions, max_tokens=max_tokens,
                                     threads=threads, codec=codec, speculate=speculate)
        if settings.serve_host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
            err.print(f"[yellow]note:[/] serving on {settings.serve_host} without an API key: "
                      f"anyone who reaches the port can use the cluster (set ORCH_API_KEY)")
        _check_port_free(settings.serve_host, settings.serve_port)
        with ExitStack() as stack:
            opened = open_model(stack, model, parse_workers(workers) if workers else None,
                                settings, err, discover=workers is None and local is None,
                                force=force)
            name = model.rsplit("/", 1)[-1].removesuffix(".gguf")
            broken: list[str] = []

            def stop(reason: str) -> None:  # a dead worker: every later answer would fail
                broken.append(reason)
                server.should_exit = True

            config = uvicorn.Config(create_app(opened.model, name, settings, stop),
                                    host=settings.serve_host, port=settings.serve_port,
                                    log_level="warning")
            server = uvicorn.Server(config)
            err.print(f"serving {name} on http://{settings.serve_host}:{settings.serve_port}/ "
                      f"(OpenAI API under /v1); Ctrl+C stops", highlight=False)
            server.run()
        if broken:
            fail(OrchError(f"stopped serving: {broken[0]}; start orch serve again to plan "
                            f"without that worker (as a service, systemd restarts it)"))
    except OrchError as exc:
        fail(exc)


def _check_port_free(host: str, port: int) -> None:
    """Before deploying anything: the port orch serve will listen on is free."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise InvalidSettingError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                                  f"choose another --port or stop what uses it") from None
