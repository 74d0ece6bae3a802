"""One table: our error types <-> gRPC status codes and data-path error codes.

A worker raises typed errors; ``to_status`` picks the gRPC code to abort with, and
``error_code`` names the error inside a data-path ``Error`` message. The orchestrator
turns either back into the same type with ``from_code``.
"""

from __future__ import annotations

import grpc

from orchestrator import errors
from orchestrator.codecs import CodecError

# Trailing-metadata key under which a worker sends the data-path code of its error.
ERROR_CODE_KEY = "orch-error"

# (error type, gRPC status, data-path code). First match wins, so subclasses come first.
_TABLE: tuple[tuple[type[Exception], grpc.StatusCode, str], ...] = (
    (errors.ContextFullError, grpc.StatusCode.RESOURCE_EXHAUSTED, "context_full"),
    (errors.MemoryBudgetError, grpc.StatusCode.RESOURCE_EXHAUSTED, "memory_budget"),
    (errors.MessageTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED, "message_too_large"),
    (errors.SessionError, grpc.StatusCode.FAILED_PRECONDITION, "session"),
    (errors.InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT, "invalid_input"),
    (CodecError, grpc.StatusCode.INVALID_ARGUMENT, "codec"),
    (errors.ShardHashError, grpc.StatusCode.DATA_LOSS, "shard_hash"),
    (errors.LayerRangeError, grpc.StatusCode.INVALID_ARGUMENT, "layer_range"),
    (errors.GGUFError, grpc.StatusCode.INVALID_ARGUMENT, "gguf"),
    (errors.ShardLoadError, grpc.StatusCode.INTERNAL, "shard_load"),
    (errors.ComputeError, grpc.StatusCode.INTERNAL, "compute"),
    (errors.EngineError, grpc.StatusCode.INTERNAL, "engine"),
)
_BY_CODE = {code: exc for exc, _status, code in _TABLE}


def to_status(exc: BaseException) -> grpc.StatusCode:
    for exc_type, status, _code in _TABLE:
        if isinstance(exc, exc_type):
            return status
    return grpc.StatusCode.INTERNAL


def error_code(exc: BaseException) -> str:
    for exc_type, _status, code in _TABLE:
        if isinstance(exc, exc_type):
            return code
    return "internal"


def from_code(code: str, worker: str, message: str) -> errors.OrchError:
    """The typed error for a data-path ``Error``, its message naming the worker."""
    exc_type = _BY_CODE.get(code)
    if exc_type is None or issubclass(exc_type, errors.GGUFError):
        return errors.WorkerError(worker, message)
    if worker in message:
        return exc_type(message)
    return exc_type(f"worker {worker}: {message}")
