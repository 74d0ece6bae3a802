"""``orch run``: resolve the model, get workers, deploy the plan, stream the answer."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from orchestrator.facts import read_model_facts
from orchestrator.localcluster import LocalCluster
from orchestrator.modelstore import cache_dir, resolve_model
from orchestrator.pipeline import Pipeline, ShardStore, StepStats, make_plan
from orchestrator.tokenizer import StopMatcher, StreamDecoder, Tokenizer
from worker.cpu import cpu_info
from worker.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """What ``orch run`` was asked to do; the CLI's options are the one place with defaults."""

    model: str
    prompt: str | None
    workers: list[str] | None
    local: int
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    seed: int
    codec: str
    context: int
    stops: tuple[str, ...]
    chat: bool
    system: str | None
    token: str | None
    stats: bool

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              min_p=self.min_p, repeat_penalty=self.repeat_penalty,
                              seed=self.seed)


def run_model(opts: RunOptions, out: Console, err: Console) -> None:
    sampling = opts.sampling()
    path = resolve_model(opts.model)
    facts = read_model_facts(path)
    facts.require_supported()
    with ExitStack() as stack:
        tokenizer = stack.enter_context(Tokenizer.from_gguf(path))
        alive = None
        if opts.workers:
            addresses, token = opts.workers, opts.token
        else:
            # In one stream the stages take turns, so each may use every core while it
            # computes (docs/benchmarks.md: 2 x 2 threads beat 2 x 1 on 2 cores).
            threads = cpu_info().cores
            with err.status(f"starting {opts.local} local workers"):
                cluster = stack.enter_context(LocalCluster(
                    opts.local, cache_dir() / "local", threads))
            addresses, token, alive = cluster.addresses, cluster.token, cluster.check_alive
        plan = make_plan(facts, addresses, codec=opts.codec, context_tokens=opts.context)
        pipeline = Pipeline(plan, facts, token, alive=alive)
        stack.callback(pipeline.close)
        pipeline.check_workers()
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      DownloadColumn(), TransferSpeedColumn(), console=err,
                      transient=True) as bars:
            pipeline.deploy(ShardStore(cache_dir() / "shards-out"), RichProgress(bars))
        for line in plan.describe():
            err.print(f"[dim]{line}[/]")
        if opts.prompt is not None:
            _answer(pipeline, tokenizer, opts, sampling, _messages(opts, [], opts.prompt), out,
                    err)
        else:
            _chat(pipeline, tokenizer, opts, sampling, out, err)


class RichProgress:
    """Deployment steps as rich progress bars (bytes for writes and uploads)."""

    def __init__(self, bars: Progress) -> None:
        self.bars = bars
        self.current: TaskID | None = None

    def task(self, description: str, total: int | None) -> Callable[[int, int], None]:
        if self.current is not None:
            self.bars.update(self.current, visible=False)
        task = self.current = self.bars.add_task(description, total=total)

        def advance(done: int, total: int) -> None:
            self.bars.update(task, completed=done, total=total)

        return advance


def _messages(opts: RunOptions, history: list[dict[str, str]], text: str
              ) -> list[dict[str, str]]:
    system = [{"role": "system", "content": opts.system}] if opts.system else []
    return [*system, *history, {"role": "user", "content": text}]


def _encode(tokenizer: Tokenizer, opts: RunOptions, messages: list[dict[str, str]]
            ) -> list[int]:
    if opts.chat and tokenizer.chat_template:
        return tokenizer.encode_chat(messages)
    return tokenizer.encode(messages[-1]["content"])


def _answer(pipeline: Pipeline, tokenizer: Tokenizer, opts: RunOptions,
            sampling: SamplingParams, messages: list[dict[str, str]], out: Console,
            err: Console) -> str:
    prompt = _encode(tokenizer, opts, messages)
    session = uuid.uuid4().hex[:8]
    stats = StepStats()
    text = ""
    try:
        for piece in _stream(pipeline, tokenizer, opts, sampling, session, prompt, stats):
            out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
            text += piece
    finally:
        pipeline.end_session(session)
    out.print()
    if opts.stats:
        _print_stats(stats, pipeline, err)
    return text


def _stream(pipeline: Pipeline, tokenizer: Tokenizer, opts: RunOptions,
            sampling: SamplingParams, session: str, prompt: list[int], stats: StepStats
            ) -> Iterator[str]:
    decoder = StreamDecoder(tokenizer)
    stops = StopMatcher(opts.stops)
    for token in pipeline.generate(session, prompt, sampling, opts.max_tokens, stats):
        if tokenizer.is_end_of_generation(token):
            break
        text, stopped = stops.feed(decoder.feed(token))
        if text:
            yield text
        if stopped:
            return
    tail, _ = stops.feed(decoder.flush())
    yield tail + stops.flush()


def _chat(pipeline: Pipeline, tokenizer: Tokenizer, opts: RunOptions,
          sampling: SamplingParams, out: Console, err: Console) -> None:
    err.print("[dim]chat: empty line or Ctrl-D to quit[/]")
    history: list[dict[str, str]] = []
    while True:
        try:
            line = out.input("[bold]> [/]")
        except EOFError:
            break
        if not line.strip():
            break
        answer = _answer(pipeline, tokenizer, opts, sampling, _messages(opts, history, line),
                         out, err)
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]


def _print_stats(stats: StepStats, pipeline: Pipeline, err: Console) -> None:
    table = Table(title="run statistics")
    table.add_column("what")
    table.add_column("value", justify="right")
    if stats.prompt_s:
        table.add_row("prompt", f"{stats.prompt_tokens} tokens, "
                                f"{stats.prompt_tokens / stats.prompt_s:.1f} tokens/s")
        table.add_row("time to first token", f"{stats.first_token_s * 1e3:.0f} ms")
    n = stats.decode_tokens
    if n:
        per_token = stats.decode_s / n * 1e3
        table.add_row("decode", f"{n} tokens, {n / stats.decode_s:.1f} tokens/s "
                                f"({per_token:.1f} ms/token)")
        compute = sum(stats.compute_ms.values()) / n
        for stage in pipeline.plan.stages:
            ms = stats.compute_ms.get(stage.index, 0.0) / n
            table.add_row(f"stage {stage.index} {stage.layers} compute", f"{ms:.2f} ms/token")
        for index, total in sorted(stats.wire_bytes.items()):
            table.add_row(f"hop {index}->{index + 1} ({pipeline.plan.codec})",
                          f"{total / n:.0f} bytes/token")
        table.add_row("wire + queues", f"{max(0.0, per_token - compute):.2f} ms/token")
    err.print(table)
