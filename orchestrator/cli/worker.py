"""``orch worker`` (and ``install`` / ``uninstall``) and ``orch doctor``: this machine as a
node of the cluster."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from orchcore.errors import InvalidSettingError, OrchError, describe_validation
from orchestrator.cli.app import app, console, err, fail, setup_logging


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
    setup_logging(False)
    from worker.doctor import doctor_options, failed, render_table, run_checks, to_json
    from worker.settings import WorkerSettings

    try:
        options = doctor_options(WorkerSettings, env_file=env_file, port=port,
                                 cache_dir=cache_dir)
    except OrchError as exc:
        fail(exc)
    with err.status("checking this machine"):
        checks = run_checks(options)
    if as_json:
        console.print_json(data=to_json(checks))
    else:
        render_table(checks, console)
    if failed(checks):
        raise typer.Exit(1)

@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
def worker(ctx: typer.Context) -> None:
    """Run one worker in the foreground (flags: orch worker --help; env ORCH_WORKER_*).
    `orch worker install` makes it a systemd service, `orch worker uninstall` removes it."""
    if ctx.args[:1] in (["install"], ["uninstall"]):
        typer.main.get_command(worker_service)(ctx.args, prog_name="orch worker")
    if {"--help", "-h"} & set(ctx.args):
        _worker_help()
        raise typer.Exit(0)
    from orchcore.cpu import cpu_info, memory_info
    from worker.baseline import process_baseline
    from worker.server import serve
    from worker.settings import WorkerSettings, fit_to_machine

    try:
        settings = WorkerSettings(_cli_parse_args=ctx.args, _cli_prog_name="orch worker",
                                  _cli_kebab_case=True)
        cores = cpu_info().cores  # the budget's floor: this process, measured (kept)
        baseline = process_baseline(settings.state_dir, settings.engine_threads(cores))
        warnings = fit_to_machine(settings, memory_info().total, cores, baseline)
    except ValidationError as exc:
        fail(InvalidSettingError(describe_validation(exc, {
            name: f"--{name.replace('_', '-')} (ORCH_WORKER_{name.upper()})"
            for name in WorkerSettings.model_fields})))
    except OrchError as exc:
        fail(exc)
    for warning in warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    setup_logging(False)
    logging.getLogger("worker").setLevel(logging.INFO)
    try:
        serve(settings)
    except OrchError as exc:
        fail(exc)


def _worker_help() -> None:
    """``orch worker --help`` in the look of every other command, drawn from the fields of
    ``WorkerSettings`` (their flags, help, defaults and variables: one source of truth)."""
    from rich.panel import Panel
    from rich.table import Table

    from worker.settings import WorkerSettings

    console.print("\n Usage: orch worker [OPTIONS]\n         orch worker install|uninstall "
                  "[OPTIONS]   (the systemd service; --help for theirs)\n", highlight=False)
    console.print(" " + (worker.__doc__ or "").split("\n")[0] + "\n", highlight=False)
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for name, field in WorkerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default
        shown = "" if default in (None, "") or hasattr(default, "get_secret_value") \
            else f" [dim]\\[default: {default}][/]"
        table.add_row(flag, f"{field.description}{shown}")
    table.add_row("--help", "Show this message and exit.")
    console.print(Panel(table, title="Options", title_align="left", border_style="dim"))


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
        if not token:
            fail(InvalidSettingError("--token -: standard input held no token; give the "
                                     "token on its first line, or leave --token out for a "
                                     "new random one"))
    request = InstallRequest(root=Path(root), token=token, port=port, budget_mb=budget_mb,
                             cache_max_mb=cache_max_mb, enable=enable)
    try:
        install(request, lambda line: console.print(line, highlight=False, soft_wrap=True))
    except OrchError as exc:
        fail(exc)


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
        fail(exc)
