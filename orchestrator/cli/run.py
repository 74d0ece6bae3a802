"""``orch run``, ``orch plan`` and ``orch verify``: a model on workers, its plan, and its
split checked against the whole."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.text import Text

from orchcore.errors import InvalidInputError, InvalidSettingError, OrchError
from orchestrator.cli.app import FLAGS, app, console, err, fail, setting_option, setup_logging
from orchestrator.settings import OrchSettings


@app.command()
def run(
    model: Annotated[str, typer.Argument(
        help="A .gguf file, a known name (smollm2-135m; orch list shows them), an https:// URL "
             "or hf://OWNER/REPO/FILE.gguf.")],
    prompt: Annotated[str | None, typer.Argument(
        help="Prompt to answer; '-' reads it from stdin, as does a pipe when it is omitted "
             "(all of it: one prompt); omit it in a terminal for an interactive chat.")
    ] = None,
    workers: Annotated[str | None, typer.Option(
        help="Workers as HOST:PORT,HOST:PORT, or @FILE with one per line; without it, the "
             "workers found on the LAN, else local worker processes.")] = None,
    local: Annotated[int | None, setting_option("local_workers", "--local")] = None,
    max_tokens: Annotated[int | None, setting_option("max_tokens", "--max-tokens")] = None,
    temperature: Annotated[float | None, setting_option("temperature", "--temperature")] = None,
    top_k: Annotated[int | None, setting_option("top_k", "--top-k")] = None,
    top_p: Annotated[float | None, setting_option("top_p", "--top-p")] = None,
    min_p: Annotated[float | None, setting_option("min_p", "--min-p")] = None,
    repeat_penalty: Annotated[float | None, setting_option(
        "repeat_penalty", "--repeat-penalty")] = None,
    seed: Annotated[int | None, setting_option("seed", "--seed")] = None,
    codec: Annotated[str | None, setting_option("codec", "--codec")] = None,
    fetch: Annotated[str | None, setting_option("fetch", "--fetch")] = None,
    context: Annotated[int | None, setting_option("context_tokens", "--context")] = None,
    max_sessions: Annotated[int | None, setting_option("max_sessions", "--max-sessions")] = None,
    threads: Annotated[int | None, setting_option("threads", "--threads")] = None,
    objective: Annotated[str | None, setting_option("objective", "--objective")] = None,
    speculate: Annotated[str | None, setting_option("speculate", "--speculate")] = None,
    replan: Annotated[bool | None, setting_option("replan", "--replan")] = None,
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
    setup_logging(verbose)
    from orchestrator.cli.running import Reported, RunRequest, WorkerChoice, run_model

    try:
        if prompt == "-" or (prompt is None and sys.stdin is not None
                             and not sys.stdin.isatty()):
            prompt = _stdin_prompt()
        settings = OrchSettings.load(
            FLAGS, local_workers=local, max_tokens=max_tokens, temperature=temperature,
            top_k=top_k,
            top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, codec=codec,
            context_tokens=context, max_sessions=max_sessions, threads=threads, token=token,
            objective=objective, fetch=fetch, speculate=speculate, replan=replan,
            logprob_rows=1)  # orch run scores no prompt: no rows kept for it
        if settings.speculation().on and settings.sampling().penalised:
            raise InvalidSettingError("speculation needs --repeat-penalty 1 (a penalty "
                                      "depends on each drafted row's history); or "
                                      "--speculate off")
        request = RunRequest(
            model=model, prompt=prompt, workers=WorkerChoice.from_flags(workers, local),
            stops=tuple(stop or ()), chat=chat, system=system, stats=stats, force=force)
        run_model(request, settings, console, err)
    except Reported:
        raise typer.Exit(1) from None
    except OrchError as exc:
        fail(exc)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None



def _stdin_prompt() -> str:
    """All of stdin as one prompt, its trailing line ends dropped (as a shell's ``$(...)``
    does). Bytes that are not UTF-8 are kept as the tokenizer's check expects them (the
    same as in an argument), so it names the first one."""
    if sys.stdin is None:
        raise InvalidInputError("no prompt: give one as an argument or on stdin")
    text = sys.stdin.buffer.read().decode("utf-8", "surrogateescape").rstrip("\r\n")
    if not text.strip():
        raise InvalidInputError("stdin holds no prompt: pipe some text in, give the prompt as "
                                "an argument, or run in a terminal for a chat")
    return text


@app.command()
def plan(
    model: Annotated[str, typer.Argument(
        help="A .gguf file, a known name (smollm2-135m; orch list shows them), an https:// URL "
             "or hf://OWNER/REPO/FILE.gguf.")],
    workers: Annotated[str | None, typer.Option(
        help="Running workers as HOST:PORT,HOST:PORT; without it, the plan for --local "
             "workers on this machine.")] = None,
    local: Annotated[int | None, setting_option("local_workers", "--local")] = None,
    context: Annotated[int | None, setting_option("context_tokens", "--context")] = None,
    max_sessions: Annotated[int | None, setting_option("max_sessions", "--max-sessions")] = None,
    objective: Annotated[str | None, setting_option("objective", "--objective")] = None,
    codec: Annotated[str | None, setting_option("codec", "--codec")] = None,
    threads: Annotated[int | None, setting_option("threads", "--threads")] = None,
    replan: Annotated[bool | None, setting_option("replan", "--replan")] = None,
    token: Annotated[str | None, typer.Option(
        help="Cluster token of the workers (or ORCH_TOKEN).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Show how MODEL would be cut across the workers, and what each stage needs, without
    sending anything (workers as for `orch run`: listed, local, or found on the LAN)."""
    setup_logging(False)
    from orchestrator.cli.running import WorkerChoice, plan_only

    try:
        settings = OrchSettings.load(FLAGS, local_workers=local, context_tokens=context,
                                     max_sessions=max_sessions, objective=objective,
                                     codec=codec, threads=threads, replan=replan,
                                     token=token, logprob_rows=1)  # as orch run deploys
        made = plan_only(model, WorkerChoice.from_flags(workers, local), settings, err=err)
    except OrchError as exc:
        fail(exc)
    if as_json:
        console.print_json(data=made.to_json())
        return
    for line in made.describe():
        console.print(line, highlight=False)
    for stage in made.stages:  # what each stage's figure is made of
        process = "measured" if stage.device.baseline_bytes else "assumed: not reported"
        console.print(f"stage {stage.index} memory: {stage.memory.describe()}; the worker's "
                      f"process with nothing loaded {process}", highlight=False)

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
    from orchestrator.models.store import resolve_model
    from orchestrator.pipeline.verify import verify_split
    from orchestrator.text.tokenizer import Tokenizer

    try:
        path = resolve_model(model)
        read_model_facts(path).require_supported()  # before the vocabulary: the real reason
        with Tokenizer.from_gguf(path) as tokenizer:
            tokens = tokenizer.encode(prompt)
            with err.status(f"running the model whole and in {stages} ranges"):
                result = verify_split(path, tokens, stages, steps, threads)
            text = tokenizer.decode(list(result.tokens_whole))
    except OrchError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"layer ranges: {' '.join(str(r) for r in result.ranges)}", highlight=False)
    differ = next((i for i, (a, b) in enumerate(zip(result.tokens_whole, result.tokens_split,
                                                    strict=True)) if a != b), None)
    same = ("the split model picked the same token at every step" if differ is None else
            f"the split model picked another token at step {differ + 1}")
    console.print(f"the unsplit model's greedy continuation of the prompt, "
                  f"{len(result.tokens_whole)} tokens (raw text, no chat template; {same}):",
                  highlight=False, markup=False, soft_wrap=True)
    console.print(Text.assemble(prompt, (text, "bold")), highlight=False)
    verdict = "[green]identical[/]" if result.exact else "[red]DIFFERENT[/]"
    console.print(f"logits of {result.identical_steps}/{result.steps} steps {verdict} to the "
                  f"unsplit model (max abs diff {result.max_abs_diff:g})")
    if not result.exact:
        raise typer.Exit(2)
