"""orch: run GGUF language models across the ordinary computers of a home or office."""

__version__ = "0.1.0"
