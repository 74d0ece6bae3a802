"""The drafter a run loads on this machine: the draft model of ``--speculate draft:MODEL``
(a file or a known model's name), or the exit shard of ``--speculate early:K`` (the
model's first K layers with its final norm and head, cut here into the cache)."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from orchcore.cpu import cpu_info
from orchcore.errors import InvalidSettingError, ModelNotFoundError
from orchcore.facts import read_model_facts
from orchcore.paths import cache_dir
from orchcore.shard import write_exit_shard
from orchestrator.cli.app import note_on
from orchestrator.models.store import Store
from orchestrator.pipeline.drafting import HostDraft
from orchestrator.settings import OrchSettings


def open_draft(stack: ExitStack, settings: OrchSettings, target: Path, err: Console, *,
               whole: bool = True) -> HostDraft | None:
    """The draft model of ``--speculate draft:MODEL`` (a file or a known model's name,
    resolved as the model is) or ``early:K`` (the exit shard of ``target``'s first K layers,
    cut here: ``whole`` says the file is), loaded here after its vocabulary is checked
    against ``target``'s; closed with ``stack``. None for any other mode."""
    mode = settings.speculation()
    if mode.kind == "early":
        path = exit_shard(target, mode.exit_layers, whole, err)
    elif mode.draft_model is not None:
        store = Store(notify=note_on(err))
        try:
            path = store.resolve(mode.draft_model)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"the draft model of --speculate draft:MODEL: {exc}"
                                     ) from None
    else:
        return None
    config = replace(settings.engine(settings.local_threads(cpu_info().cores)), output_rows=1)
    with err.status(f"loading the draft model {path.name}"):
        draft = HostDraft(path, target, config)
    stack.callback(draft.close)
    return draft


def exit_shard(target: Path, k: int, whole: bool, err: Console) -> Path:
    """The exit shard of ``target``'s first ``k`` layers (``--speculate early:K``), cut here
    once into the cache; an older one of the same model is replaced."""
    facts = read_model_facts(target)
    if not 1 <= k < facts.n_layers:
        raise InvalidSettingError(f"early:K: K is how many of the model's first layers draft, "
                                  f"1 to {facts.n_layers - 1} for {target.name} "
                                  f"({facts.n_layers} layers)")
    if not whole:
        raise InvalidSettingError("early:K cuts the model's first layers on this machine, so "
                                  "it needs the whole file here: orch pull it first, or run "
                                  "with --fetch orchestrator")
    stat = target.stat()
    folder = cache_dir() / "exit"
    dest = folder / f"{target.stem}.{stat.st_size}.{stat.st_mtime_ns}.exit{k}.gguf"
    if not dest.exists():
        for old in folder.glob(f"{target.stem}.*.exit*.gguf"):
            old.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        with err.status(f"cutting {target.name}'s first {k} layers and its head as its "
                        f"drafter"):
            write_exit_shard(target, k, dest)
    return dest
