"""``orch serve``: the OpenAI-compatible server over a deployed model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchcore.errors import InvalidSettingError, OrchError
from orchestrator.cli.app import FLAGS, app, err, fail, setting_option, setup_logging
from orchestrator.settings import OrchSettings


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
    queue_wait: Annotated[float | None, setting_option("serve_queue_wait_s",
                                                       "--queue-wait")] = None,
    max_body: Annotated[int | None, setting_option("serve_max_body_bytes",
                                                   "--max-body-bytes")] = None,
    tls: Annotated[str | None, setting_option("serve_tls", "--tls")] = None,
    tls_cert: Annotated[Path | None, setting_option("serve_tls_cert", "--tls-cert")] = None,
    tls_key: Annotated[Path | None, setting_option("serve_tls_key", "--tls-key")] = None,
    alias: Annotated[list[str] | None, typer.Option(
        metavar="NAME", help="Another model name clients may ask for (repeatable), for a "
                             "client that insists on one: --alias gpt-4o-mini. Other names "
                             "get 404.")] = None,
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
    Every request field and what orch does with it: docs/api.md.
    """
    setup_logging(verbose)
    from contextlib import ExitStack

    import uvicorn

    from orchestrator.cli.running import WorkerChoice, open_model
    from orchestrator.serve.app import create_app
    from orchestrator.serve.tls import tls_files

    try:
        settings = OrchSettings.load(FLAGS, local_workers=local, serve_host=host,
                                     serve_port=port, serve_queue=queue,
                                     serve_queue_wait_s=queue_wait,
                                     serve_max_body_bytes=max_body, serve_tls=tls,
                                     serve_tls_cert=tls_cert, serve_tls_key=tls_key,
                                     context_tokens=context,
                                     max_sessions=max_sessions, max_tokens=max_tokens,
                                     threads=threads, codec=codec, speculate=speculate)
        https = tls_files(settings.serve_tls, settings.serve_tls_cert, settings.serve_tls_key)
        _warn_if_open(settings.serve_host, bool(settings.api_key), https is not None)
        _check_port_free(settings.serve_host, settings.serve_port)
        with ExitStack() as stack:
            opened = open_model(stack, model, WorkerChoice.from_flags(workers, local),
                                settings, err, force=force)
            name = model.rsplit("/", 1)[-1].removesuffix(".gguf")
            broken: list[str] = []

            def stop(reason: str) -> None:  # a dead worker: every later answer would fail
                broken.append(reason)
                server.should_exit = True

            config = uvicorn.Config(create_app(opened.model, name, settings, stop, alias or ()),
                                    host=settings.serve_host, port=settings.serve_port,
                                    log_level="warning",
                                    ssl_certfile=https and str(https.cert),
                                    ssl_keyfile=https and str(https.key))
            server = uvicorn.Server(config)
            names = ", ".join(dict.fromkeys([name, *(alias or ())]))
            scheme = "https" if https else "http"
            err.print(f"serving {names} on {scheme}://{settings.serve_host}:"
                      f"{settings.serve_port}/ (OpenAI API under /v1); Ctrl+C stops",
                      highlight=False)
            if https and https.fingerprint:
                err.print(f"self-signed certificate, SHA-256 fingerprint {https.fingerprint} "
                          f"(file {https.cert})", highlight=False)
            server.run()
        if broken:
            fail(OrchError(f"stopped serving: {broken[0]}; start orch serve again to plan "
                            f"without that worker (as a service, systemd restarts it)"))
    except OrchError as exc:
        fail(exc)


def _warn_if_open(host: str, keyed: bool, https: bool) -> None:
    """Binding beyond loopback: say what anyone on the network can do or see."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return
    if not keyed:
        err.print(f"[yellow]note:[/] serving on {host} without an API key: anyone who reaches "
                  f"the port can use the cluster (set ORCH_API_KEY)")
    if not https:
        err.print(f"[yellow]note:[/] serving on {host} over plain HTTP: the API key and every "
                  f"prompt and answer cross the network in the clear (--tls self-signed, or "
                  f"--tls-cert and --tls-key)")


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
