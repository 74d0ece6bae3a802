"""The ``orch`` app and what its commands share: the consoles, flags drawn from the settings,
and how a typed error ends a command. Output for people goes through rich; logs go to stderr."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import NoReturn

import typer
from rich.console import Console

from orchcore.errors import OrchError
from orchestrator.settings import OrchSettings

app = typer.Typer(
    help="Run GGUF language models across the ordinary computers of a home or office.\n\n"
         "Quick start: `orch run smollm2-135m \"The capital of France is\"` starts two local "
         "workers, splits the model between them and streams the answer.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True, soft_wrap=True)  # a message stays one line for tools that read it


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


FLAGS: dict[str, str] = {}  # settings field -> its flag, for errors (OrchSettings.load)


def setting_option(field: str, *flags: str) -> typer.models.OptionInfo:
    """A flag whose help, default and ORCH_* variable come from ``OrchSettings``."""
    FLAGS.setdefault(field, flags[0])
    info = OrchSettings.model_fields[field]
    default = info.default.get_secret_value() if hasattr(info.default, "get_secret_value") \
        else info.default
    shown = "" if default is None else f"default {default}; "
    return typer.Option(*flags, help=f"{info.description} ({shown}env ORCH_{field.upper()})",
                        show_default=False)


def note_on(out: Console) -> Callable[[str], None]:
    """What a command prints for a note (a model's store, a fetch): one yellow line."""
    def note(text: str) -> None:
        out.print(f"[yellow]note:[/] {text}", highlight=False)

    return note


def fail(exc: OrchError) -> NoReturn:
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(1) from None


def main() -> None:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    app()

