"""The ``orch`` command: one module per command group, all on one Typer app (``app``).

Importing a group registers its commands, in the order ``orch --help`` lists them.
"""

from orchestrator.cli import run, serve, worker, cluster, pi, models  # noqa: F401, I001
from orchestrator.cli.app import app, main

__all__ = ["app", "main"]
