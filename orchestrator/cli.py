"""``orch``: the command line. Output for people goes through rich; logs go to stderr."""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.errors import OrchError

app = typer.Typer(
    help="Run GGUF language models across the ordinary computers of a home or office.\n\n"
         "Quick start: `orch run smollm2-135m \"The capital of France is\"` starts two local "
         "workers, splits the model between them and streams the answer.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="A .gguf file, or a known name: smollm2-135m.")],
    prompt: Annotated[str | None, typer.Argument(
        help="Prompt to answer; omit it for an interactive chat.")] = None,
    workers: Annotated[str | None, typer.Option(
        help="Running workers as HOST:PORT,HOST:PORT (in pipeline order).")] = None,
    local: Annotated[int, typer.Option(
        min=1, max=16, help="Without --workers: local worker processes to start.")] = 2,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0, help="0 = off.")] = 40,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="1 = off.")] = 0.95,
    min_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="0 = off.")] = 0.05,
    repeat_penalty: Annotated[float, typer.Option(min=0.0, help="1 = off.")] = 1.0,
    seed: Annotated[int, typer.Option(min=0, help="Sampling seed (reproducible runs).")] = 42,
    codec: Annotated[str, typer.Option(
        help="Hidden states on the wire: f32 (exact), f16 (half the bytes), q8_0 "
             "(3.8x fewer bytes).")] = "f32",
    context: Annotated[int, typer.Option(min=64, help="Context length in tokens.")] = 2048,
    stop: Annotated[list[str] | None, typer.Option(
        help="Stop when this text appears (repeatable).")] = None,
    chat: Annotated[bool, typer.Option(
        help="Wrap the prompt in the model's chat template.")] = True,
    system: Annotated[str | None, typer.Option(help="System message for chat.")] = None,
    token: Annotated[str | None, typer.Option(
        envvar="ORCH_TOKEN", help="Cluster token of the workers (--workers).")] = None,
    stats: Annotated[bool, typer.Option(
        help="Print tokens/s, per-stage compute and wire bytes.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Generate with MODEL split across workers: local processes, or --workers."""
    _setup_logging(verbose)
    from orchestrator.generate import RunOptions, run_model

    options = RunOptions(
        model=model, prompt=prompt, workers=workers.split(",") if workers else None,
        local=local, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, codec=codec,
        context=context, stops=tuple(stop or ()), chat=chat, system=system, token=token,
        stats=stats)
    try:
        run_model(options, console, err)
    except OrchError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
def worker(ctx: typer.Context) -> None:
    """Run one worker in the foreground (flags: orch worker --help; env ORCH_WORKER_*)."""
    from worker.service import serve
    from worker.settings import WorkerSettings

    settings = WorkerSettings(_cli_parse_args=ctx.args, _cli_prog_name="orch worker",
                              _cli_kebab_case=True)
    _setup_logging(False)
    logging.getLogger("worker").setLevel(logging.INFO)
    serve(settings)


@app.command()
def info(model: Annotated[str, typer.Argument(help="A .gguf file or a known model name.")]
         ) -> None:
    """Show what a GGUF model is made of: shape, layers, bytes, KV cache per token."""
    from orchestrator.facts import read_model_facts
    from orchestrator.modelstore import resolve_model

    try:
        facts = read_model_facts(resolve_model(model))
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
    from orchestrator.modelstore import resolve_model
    from orchestrator.tokenizer import Tokenizer
    from orchestrator.verify import verify_split

    try:
        path = resolve_model(model)
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
