"""``orch cluster`` and ``orch rotate-token``: the workers on the network, seen and managed
from here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from orchcore.errors import InvalidSettingError, OrchError
from orchestrator.cli.app import FLAGS, app, console, err, fail, setup_logging
from orchestrator.settings import OrchSettings

if TYPE_CHECKING:
    from orchestrator.cluster.topology import WorkerView


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
    setup_logging(False)
    import sys

    from orchcore import clustertoken
    from orchestrator.cli.running import WorkerChoice
    from orchestrator.cluster.client import WorkerClient

    try:
        settings = OrchSettings.load()
        if settings.token_value is None:
            raise InvalidSettingError("give the current cluster token as ORCH_TOKEN first")
        addresses = WorkerChoice.from_flags(workers).required(settings, err)
        token = sys.stdin.readline().strip() if new == "-" else new
        token = clustertoken.generate() if token is None else token
        loopback = all(clustertoken.is_loopback(a.rpartition(":")[0]) for a in addresses)
        source = "--new -" if new == "-" else "--new"
        if warning := clustertoken.require(token, loopback=loopback, source=source):
            err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    except OrchError as exc:
        fail(exc)
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
    measured links (orchestrator to each worker, each worker to the next). Workers that do
    not answer or hold another token are listed with the reason (exit code 1)."""
    setup_logging(False)
    from orchestrator.cli.running import WorkerChoice
    from orchestrator.cluster.topology import survey, to_json

    try:
        settings = OrchSettings.load(FLAGS, token=token)
        addresses = WorkerChoice.from_flags(workers).required(settings, err)
        with err.status("asking the workers and measuring links"):
            found = survey(addresses, settings)
    except OrchError as exc:
        fail(exc)
    if as_json:
        console.print_json(data=to_json(found))
    elif found.workers:
        _print_cluster(found.workers)
    for worker in found.unreached:
        err.print(f"[red]{worker.address}[/] not mapped: {worker.reason}", highlight=False)
    if found.unreached:
        raise typer.Exit(1)


def _print_cluster(views: Sequence[WorkerView]) -> None:
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
            f"budget {v.budget_mb}\n"
            + (f"process {v.baseline_mb} idle\n" if v.baseline_mb else "")
            + f"free {v.ram_available_mb} of {v.ram_total_mb}",
            f"{v.cached_shards} shards\n{v.cache_used_mb} of {v.cache_max_mb} MiB",
            v.loaded + (f"\n{v.holders} holder{'s' if v.holders > 1 else ''}"
                        if v.holders else ""),
            links)
    console.print(table)
    for v in views:
        if v.problem:
            err.print(f"[yellow]{v.address}[/] {v.problem}", highlight=False)
