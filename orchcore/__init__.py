"""The vocabulary the orchestrator and the workers share.

Both sides depend on this package and never on each other (an import-linter contract in
pyproject.toml holds them to it): typed errors and their status table, GGUF facts, the
shard layout and layer ranges, engine settings and the memory estimate, codecs, sampling
parameters, the wire (generated code, conversion, channels, auth), the cache location, and
the llama.cpp engine that both a worker and ``orch verify`` run.
"""

__version__ = "0.1.0"
