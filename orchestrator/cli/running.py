"""``orch run``: resolve the model, get workers, show the plan, deploy it, render events.

Everything here is terminal output around the session API (``orchestrator.pipeline.session``).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

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

from orchcore.cpu import cpu_info, host_id, memory_info
from orchcore.devices import DeviceFacts
from orchcore.diskspace import size_text
from orchcore.errors import (
    ContextFullError,
    InvalidInputError,
    NoRangeError,
    OrchError,
)
from orchcore.facts import ModelFacts, read_model_facts
from orchcore.memory import default_budget
from orchcore.paths import cache_dir
from orchcore.probe import layer_shape
from orchestrator.cli.app import note_on
from orchestrator.cli.drafts import open_draft
from orchestrator.cluster.discover import discover
from orchestrator.cluster.local import LocalCluster
from orchestrator.models.remote import check_header, expected_for, open_remote, published
from orchestrator.models.store import Store
from orchestrator.pipeline.connected import Cluster
from orchestrator.pipeline.deploy import Deployment, FromSource, forget_shard_copies
from orchestrator.pipeline.session import (
    Failover,
    Finished,
    GenerationStats,
    RunningModel,
    TextPiece,
    encode_prompt,
)
from orchestrator.planning.plan import Plan, PlanOptions, make_plan
from orchestrator.planning.speeds import SpeedBook
from orchestrator.planning.sticky import PlanBook
from orchestrator.settings import OrchSettings, parse_workers
from orchestrator.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRequest:
    """What ``orch run`` was asked beyond the settings: the model, the prompt, the workers."""

    model: str
    prompt: str | None
    workers: WorkerChoice
    stops: tuple[str, ...] = ()
    chat: bool = True
    system: str | None = None
    stats: bool = False
    force: bool = False  # take workers over from another orchestrator


class Reported(OrchError):
    """An error already shown to the user; the CLI only sets the exit code."""


def report(err: Console, exc: BaseException) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False)


def run_model(req: RunRequest, settings: OrchSettings, out: Console, err: Console) -> None:
    """Errors met while answering are shown before the workers are tidied up (which may
    wait on slow ones), then raised as ``Reported``."""
    def check(tokenizer: Tokenizer) -> None:
        if req.prompt is not None:  # refuse a bad prompt before starting anything
            encode_prompt(tokenizer, _prompt(req, [], req.prompt), settings.context_tokens,
                          chat=req.chat)

    with ExitStack() as stack:
        opened = open_model(stack, req.model, req.workers, settings, err, force=req.force,
                            check=check)
        answering = _Answering(opened.model, req, settings, out, err, opened.book,
                               opened.facts)
        try:
            if req.prompt is not None:
                answering.answer(_prompt(req, [], req.prompt))
            else:
                answering.chat()
        except OrchError as exc:
            report(err, exc)
            raise Reported(str(exc)) from None


@dataclass(frozen=True)
class Opened:
    model: RunningModel
    facts: ModelFacts
    book: SpeedBook  # measured speeds: runs refine them


def open_model(stack: ExitStack, target: str, choice: WorkerChoice, settings: OrchSettings,
               err: Console, *, force: bool = False,
               check: Callable[[Tokenizer], None] | None = None) -> Opened:
    """The model deployed on the listed, discovered or local workers, its plan shown; closed
    with ``stack``. ``check`` sees the vocabulary before any worker starts."""
    path, source = locate_model(target, settings, err)
    facts = read_model_facts(path)
    facts.require_supported()
    if freed := forget_shard_copies(cache_dir()):
        err.print(f"[dim]deleted the {size_text(freed)} of shard copies older versions kept in "
                  f"{cache_dir()}: workers now cut their own shards[/]", highlight=False)
    tokenizer = stack.enter_context(Tokenizer.from_gguf(path))
    if check is not None:
        check(tokenizer)
    draft = open_draft(stack, settings, path, err, whole=source is None)
    alive = None
    workers = choice.addresses(settings, err)
    if workers:
        addresses, token = list(workers), settings.token_value
    else:
        with err.status(f"starting {_count(settings.local_workers, 'local worker')}"):
            local = stack.enter_context(LocalCluster(
                settings.local_workers, cache_dir() / "local",
                settings.local_threads(cpu_info().cores),
                start_deadline_s=settings.start_deadline_s))
        addresses, token, alive = local.addresses, local.token, local.check_alive
    cluster = Cluster.connect(addresses, token, settings, alive)
    stack.callback(cluster.close)
    book = SpeedBook(cache_dir() / "speeds.json")
    if workers and len(addresses) > 1 and settings.probe:
        _measure_speeds(cluster, facts, book, err)
    options = settings.plan_options(use_all=not workers)  # --local N: exactly N stages
    plan = _sticky_plan(facts, cluster.devices, options)
    for line in plan.describe():
        err.print(f"[dim]{line}[/]", highlight=False)
    if draft is not None:
        err.print(f"[dim]{draft.describe()}[/]", highlight=False)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  DownloadColumn(), TransferSpeedColumn(), console=err,
                  transient=True) as bars:
        model = cluster.open(plan, facts, tokenizer, RichProgress(bars, err), force=force,
                             source=source, options=options, failover=True, draft=draft)
    stack.callback(model.close)
    _report_deployment(model.deployment, err)
    return Opened(model, facts, book)


def _measure_speeds(cluster: Cluster, facts: ModelFacts, book: SpeedBook | None,
                    err: Console) -> None:
    with err.status("timing each worker on this model's layers (once per shape)"):
        untimed = cluster.measure_speeds(facts, book)
    for exc in untimed:
        err.print(f"[yellow]note:[/] not timed: {exc}; planned as a worker nothing measured",
                  highlight=False)


def _sticky_plan(facts: ModelFacts, devices: list[DeviceFacts], options: PlanOptions) -> Plan:
    """``make_plan``, keeping the cut this cluster used for this model last time while it is
    still as good (``PlanBook``)."""
    book = PlanBook(cache_dir() / "plans.json")
    plan = make_plan(facts, devices, replace(options, prefer=book.last(facts, devices, options)))
    book.keep(facts, devices, options, plan)
    return plan


@dataclass(frozen=True)
class WorkerChoice:
    """Which workers a command uses: ``--workers`` as listed (validated ``HOST:PORT``, in
    order: the plan keeps it among equals); else, unless ``--local`` was given, the workers
    of this cluster found on the LAN; else local worker processes."""

    listed: tuple[str, ...] | None = None
    discover: bool = True

    @classmethod
    def from_flags(cls, workers: str | None, local: int | None = None) -> WorkerChoice:
        """From ``--workers`` and ``--local`` (None: not given); refuses a bad list at once."""
        return cls(parse_workers(workers) if workers is not None else None,
                   discover=workers is None and local is None)

    def addresses(self, settings: OrchSettings, err: Console, *, local_fallback: bool = True
                  ) -> tuple[str, ...] | None:
        """The listed or discovered workers; None: local workers instead."""
        if self.listed is not None:
            return self.listed
        if not self.discover:
            return None
        return _discovered(settings, err, local_fallback=local_fallback)

    def required(self, settings: OrchSettings, err: Console) -> tuple[str, ...]:
        """The listed or discovered workers, for a command that starts none of its own."""
        found = self.addresses(settings, err, local_fallback=False)
        if not found:
            raise OrchError("no workers: give --workers HOST:PORT,... or start workers on the "
                            "LAN (discovery: ORCH_DISCOVERY)")
        return found


def _discovered(settings: OrchSettings, err: Console, *, local_fallback: bool
                ) -> tuple[str, ...] | None:
    """Workers of this cluster found on the LAN, after saying what was found."""
    if settings.discovery == "off":
        return None
    with err.status(f"looking for workers ({settings.discovery_timeout_s:g} s)"):
        found = discover(settings)
    for worker, why in found.others:
        err.print(f"[dim]not used: {worker.address} (worker {worker.advert.worker_id[:8]}): "
                  f"{why}[/]", highlight=False)
    if not found.members:
        then = (f"; using {_count(settings.local_workers, 'local worker')}"
                if local_fallback else "")
        err.print(f"[dim]no workers of this cluster on the network{then}[/]")
        return None
    err.print(f"[dim]found {_count(len(found.members), 'worker')}: "
              f"{', '.join(w.address for w in found.members)}[/]", highlight=False)
    return tuple(w.address for w in found.members)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def plan_only(model: str, choice: WorkerChoice, settings: OrchSettings,
              err: Console | None = None) -> Plan:
    """``orch plan``: the plan for listed or discovered workers (asked for their facts), or
    for local workers on this machine (their facts known without starting them)."""
    err = err or Console(stderr=True)
    facts = read_model_facts(locate_model(model, settings, err)[0])
    facts.require_supported()
    workers = choice.addresses(settings, err)
    if workers is None:
        return make_plan(facts, local_devices(settings), settings.plan_options(use_all=True))
    cluster = Cluster.connect(workers, settings.token_value, settings)
    try:
        if len(workers) > 1 and settings.probe:
            _measure_speeds(cluster, facts, None, err)
        return _sticky_plan(facts, cluster.devices, settings.plan_options())
    finally:
        cluster.close()


def local_devices(settings: OrchSettings) -> list[DeviceFacts]:
    """What the local workers would report: this machine, each with the default budget
    (they share its RAM, which the planner accounts for) and its share of the cores."""
    cpu, mem, host = cpu_info(), memory_info(), host_id()
    return [DeviceFacts(address=f"local #{i}", worker_id=f"local-{i}", host_id=host,
                        hostname=platform.node(), arch=cpu.arch, cores=cpu.cores,
                        threads=settings.local_threads(cpu.cores),
                        ram_total_bytes=mem.total, ram_available_bytes=mem.available,
                        memory_budget_bytes=default_budget(mem.available))
            for i in range(settings.local_workers)]


def _report_deployment(deployment: Deployment, err: Console) -> None:
    sent, fetched = deployment.sent_bytes, deployment.fetched_bytes
    if fetched:
        shards = (f"{fetched / (1 << 20):.1f} MiB fetched by the workers from the source, "
                  f"{sent / (1 << 20):.1f} MiB of shards sent from here")
    else:
        shards = (f"{sent / (1 << 20):.1f} MiB of shards sent" if sent else
                  "0 bytes of shards sent: every worker had its shard cached")
    shared = "; sharing the stages another orchestrator loaded" if deployment.shared else ""
    err.print(f"[dim]{shards}{shared}[/]")


class RichProgress:
    """Deployment steps as rich progress bars (bytes for writes and uploads)."""

    def __init__(self, bars: Progress, err: Console) -> None:
        self.bars, self.err = bars, err
        self.current: TaskID | None = None

    def task(self, description: str, total: int | None, *, alone: bool = True
             ) -> Callable[[int, int], None]:
        if self.current is not None and alone:
            self.bars.update(self.current, visible=False)
        task = self.bars.add_task(description, total=total)
        if alone:
            self.current = task

        def advance(done: int, total: int) -> None:
            self.bars.update(task, completed=done, total=total)

        return advance

    def note(self, text: str) -> None:
        note_on(self.err)(text)


def locate_model(target: str, settings: OrchSettings, err: Console
                 ) -> tuple[Path, FromSource | None]:
    """The model's file here, or (``settings.fetch`` permitting) a copy of its headers read
    from where it is published, with the source the workers fetch their slices from."""
    notify = note_on(err)
    store = Store(notify=notify)
    first = None
    if settings.fetch != "orchestrator":
        try:
            first = published(target, store, notify)
        except NoRangeError as exc:
            if settings.fetch == "workers":
                raise
            notify(f"{exc}; downloading the whole file here instead")
    if first is None:
        return store.resolve(target), None
    with err.status(f"reading the header of {first.filename} from its source"):
        remote = open_remote(first, cache_dir() / "models" / "remote")
        check_header(remote, expected_for(target, store))
    got = (f"read {remote.header_bytes / (1 << 20):.1f} MiB of headers from {first.url}"
           if remote.header_bytes else f"headers of {first.url} known from an earlier run")
    err.print(f"[dim]{got}; each worker fetches its own layers[/]", highlight=False)

    def whole() -> ModelFacts:
        notify(f"downloading all of {target} here ({first.size >> 20} MiB)")
        return read_model_facts(Store(notify=notify, progress=False).resolve(target))

    return remote.path, FromSource(remote.files, whole if settings.fetch == "auto" else None)


def _prompt(req: RunRequest, history: list[dict[str, str]], text: str
            ) -> list[dict[str, str]] | str:
    if not req.chat:
        return text
    system = [{"role": "system", "content": req.system}] if req.system else []
    return [*system, *history, {"role": "user", "content": text}]


class _Answering:
    """Renders answers as they stream, and keeps the stages' measured speeds."""

    def __init__(self, model: RunningModel, req: RunRequest, settings: OrchSettings,
                 out: Console, err: Console, book: SpeedBook, facts: ModelFacts) -> None:
        self.model, self.req, self.settings = model, req, settings
        self.out, self.err = out, err
        self.book, self.facts, self.shape_key = book, facts, layer_shape(facts).key

    def answer(self, prompt: list[dict[str, str]] | str) -> str:
        text, finished = "", False
        try:
            for event in self.model.generate(prompt, self.settings.sampling(),
                                             stops=self.req.stops,
                                             max_tokens=self.settings.max_tokens,
                                             chat=self.req.chat):
                if isinstance(event, TextPiece):
                    self.out.print(event.text, end="", markup=False, highlight=False,
                                   soft_wrap=True)
                    text += event.text
                elif isinstance(event, Failover):  # the answer goes on
                    self.err.print(f"\n[yellow]note:[/] {event.describe()}", highlight=False)
                elif isinstance(event, Finished):
                    self.out.print()
                    finished = True
                    self.model.record_speeds(event.stats, self.book, self.facts, self.shape_key)
                    if self.req.stats:
                        _print_stats(event.stats, self.model, self.err)
        except BaseException:  # Ctrl-C or an error mid-answer: what follows starts a line
            if text and not finished:
                self.out.print()
            raise
        return text

    def chat(self) -> None:
        self.err.print("[dim]chat: empty line or Ctrl-D to quit[/]")
        history: list[dict[str, str]] = []
        while True:
            try:
                line = self.out.input("[bold]> [/]")
            except EOFError:  # Ctrl-D: the shell's prompt starts a line of its own
                self.out.print()
                break
            except KeyboardInterrupt:  # so does "interrupted"
                self.out.print()
                raise
            if not line.strip():
                break
            try:
                answer = self.answer(_prompt(self.req, history, line))
            except (ContextFullError, InvalidInputError) as exc:  # this question only
                report(self.err, exc)
                if isinstance(exc, ContextFullError) and history:
                    self.err.print("[dim]the conversation no longer fits the context: quit "
                                   "and start a new chat, or raise --context[/]")
                continue
            history += [{"role": "user", "content": line},
                        {"role": "assistant", "content": answer}]


def _print_stats(stats: GenerationStats, model: RunningModel, err: Console) -> None:
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
        busy = (sum(stats.compute_ms.values()) + sum(stats.queue_ms.values())) / n
        for stage in model.plan.stages:
            ms = stats.compute_ms.get(stage.index, 0.0) / n
            predicted = (f" (predicted {stage.decode_s * 1e3:.2f})"
                         if stage.decode_s is not None else "")
            table.add_row(f"stage {stage.index} {stage.layers} on {stage.worker} compute",
                          f"{ms:.2f} ms/token{predicted}")
            if queued := stats.queue_ms.get(stage.index, 0.0) / n:
                table.add_row(f"stage {stage.index} in its queue before compute",
                              f"{queued:.2f} ms/token")
        for index, total in sorted(stats.wire_bytes.items()):
            table.add_row(f"hop {index}->{index + 1} ({model.plan.codec})",
                          f"{total / n:.0f} bytes/token")
        table.add_row("wire and hand-offs", f"{max(0.0, per_token - busy):.2f} ms/token")
        _speculation_rows(table, stats, model)
    err.print(table)


def _speculation_rows(table: Table, stats: GenerationStats, model: RunningModel) -> None:
    """Acceptance, tokens per pass, and the speedup against plain decoding's estimate: a
    pass without drafts measured in this answer, else the measured one-row pass."""
    spec = stats.speculation
    if not model.speculator.mode.on or not spec.passes:
        return
    s = spec.summary(model.settings.speculate, stats.decode_tokens, stats.decode_s,
                     model.speculator.costs)
    table.add_row("speculation", f"{s['mode']}: {s['accepted']}/{s['drafted']} drafts kept "
                                 f"(acceptance {s['acceptance']:.2f}), "
                                 f"{s['tokens_per_pass']:.2f} tokens/pass"
                                 + (f", {s['overlapped']}/{s['passes']} passes overlapped"
                                    if s["overlapped"] else ""))
    if spec.draft_s and spec.drafting_passes:
        table.add_row("drafting on this machine",
                      f"{spec.draft_s / spec.drafting_passes * 1e3:.1f} ms/pass")
    if s["speedup"] is not None:
        table.add_row("speedup against plain decoding",
                      f"{s['speedup']:.2f}x (plain estimate "
                      f"{s['plain_ms_per_token']:.1f} ms/token)")
