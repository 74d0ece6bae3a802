"""How a stage engine runs: the settings the plan gives each stage, as one pure value.

The defaults here are the defaults everywhere: ``orch run`` flags and ``ORCH_*`` settings
(``orchestrator.settings``), the plan, the wire (unset fields mean these), the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchcore.errors import InvalidSettingError

MAX_CONTEXT_TOKENS = 1 << 20
MAX_BATCH_TOKENS = 8192
MAX_SESSIONS = 256
MAX_THREADS = 1024
MAX_OUTPUT_ROWS = 1024  # prompt logprobs / embedding rows one chunk may ask for
DEFAULT_OUTPUT_ROWS = 64
# Sliding-window layers keep a KV cell for every position of the context, llama.cpp's
# default (its swa_full): a window-sized cache wraps around and holds the cells in
# another order than a whole-context cache, and attention sums cells in cell order, so
# exactness against an ordinary llama.cpp run is only proven with it on.
SWA_FULL = True


def _bounded(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidSettingError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """One stage's engine settings. Units in the names."""

    context_tokens: int = 2048  # KV-cache room of each session
    max_sessions: int = 2  # sessions that can hold a KV cache at once
    batch_tokens: int = 256  # most rows one forward call may carry (prompt chunk size)
    threads: int = 0  # 0 = every core the worker may use
    extra_buffer_types: bool | None = None  # None = decide from the CPU (AMX -> off)
    mmap: bool | None = None  # None = map the file unless llama.cpp repacks the weights
    output_rows: int = DEFAULT_OUTPUT_ROWS  # most rows of logprobs or embeddings per chunk

    def __post_init__(self) -> None:
        _bounded("context_tokens", self.context_tokens, 16, MAX_CONTEXT_TOKENS)
        _bounded("max_sessions", self.max_sessions, 1, MAX_SESSIONS)
        _bounded("batch_tokens", self.batch_tokens, 1, MAX_BATCH_TOKENS)
        _bounded("threads", self.threads, 0, MAX_THREADS)
        _bounded("output_rows", self.output_rows, 1, MAX_OUTPUT_ROWS)

    @property
    def kv_tokens(self) -> int:
        """KV cells the engine allocates: every session's full context."""
        return self.context_tokens * self.max_sessions
