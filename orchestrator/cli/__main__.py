"""``python -m orchestrator.cli``: how local clusters and services start ``orch``."""

from orchestrator.cli.app import main

main()
