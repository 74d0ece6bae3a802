"""One table: our error types <-> gRPC status codes, data-path codes, and retryability.

A worker raises typed errors; ``to_status`` picks the gRPC code to abort with, and
``error_code`` names the error inside a data-path ``Error`` message (and in the trailing
metadata of a failed call). The orchestrator turns either back into the same type with
``from_code``. ``retryable`` says whether the same request may succeed on another try or
another worker (a failover driver's question); it never depends on message text.
"""

from __future__ import annotations

from typing import NamedTuple

import grpc

from orchcore import errors
from orchcore.codecs import CodecError, UnknownCodecError

# Trailing-metadata key under which a worker sends the data-path code of its error.
ERROR_CODE_KEY = "orch-error"


class Row(NamedTuple):
    error: type[Exception]
    status: grpc.StatusCode
    code: str
    retryable: bool


# First match wins, so subclasses come first.
_TABLE: tuple[Row, ...] = (
    Row(errors.ContextFullError, grpc.StatusCode.RESOURCE_EXHAUSTED, "context_full", False),
    Row(errors.MemoryBudgetError, grpc.StatusCode.RESOURCE_EXHAUSTED, "memory_budget", False),
    Row(errors.CacheFullError, grpc.StatusCode.RESOURCE_EXHAUSTED, "cache_full", False),
    Row(errors.DiskFullError, grpc.StatusCode.RESOURCE_EXHAUSTED, "disk_full", False),
    Row(errors.MessageTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED, "message_too_large",
        False),
    Row(errors.SessionError, grpc.StatusCode.FAILED_PRECONDITION, "session", True),
    Row(errors.WorkerBusyError, grpc.StatusCode.FAILED_PRECONDITION, "busy", True),
    Row(errors.NotLoadedError, grpc.StatusCode.FAILED_PRECONDITION, "not_loaded", True),
    Row(errors.ShardMissingError, grpc.StatusCode.NOT_FOUND, "shard_missing", True),
    Row(errors.SourceFetchError, grpc.StatusCode.FAILED_PRECONDITION, "source_fetch", False),
    Row(errors.InvalidSettingError, grpc.StatusCode.INVALID_ARGUMENT, "invalid_setting", False),
    Row(errors.InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT, "invalid_input", False),
    Row(UnknownCodecError, grpc.StatusCode.INVALID_ARGUMENT, "unknown_codec", False),
    Row(CodecError, grpc.StatusCode.INVALID_ARGUMENT, "codec", False),
    Row(errors.ShardHashError, grpc.StatusCode.DATA_LOSS, "shard_hash", True),
    Row(errors.LayerRangeError, grpc.StatusCode.INVALID_ARGUMENT, "layer_range", False),
    Row(errors.UnsupportedModelError, grpc.StatusCode.INVALID_ARGUMENT, "unsupported_model",
        False),
    Row(errors.GGUFError, grpc.StatusCode.INVALID_ARGUMENT, "gguf", False),
    Row(errors.ShardLoadError, grpc.StatusCode.INTERNAL, "shard_load", False),
    Row(errors.ComputeError, grpc.StatusCode.INTERNAL, "compute", True),
    Row(errors.EngineError, grpc.StatusCode.INTERNAL, "engine", True),
    Row(errors.StageFaultError, grpc.StatusCode.INTERNAL, "stage_fault", True),
    Row(errors.WorkerUnreachableError, grpc.StatusCode.UNAVAILABLE, "unreachable", True),
    Row(errors.AuthError, grpc.StatusCode.UNAUTHENTICATED, "auth", False),
    Row(errors.ProtocolMismatchError, grpc.StatusCode.FAILED_PRECONDITION, "protocol", False),
    Row(errors.WorkerError, grpc.StatusCode.UNKNOWN, "worker", True),
)
_BY_CODE = {row.code: row for row in _TABLE}
_INTERNAL = Row(errors.StageFaultError, grpc.StatusCode.INTERNAL, "internal", True)


def _row(exc: BaseException) -> Row:
    return next((row for row in _TABLE if isinstance(exc, row.error)), _INTERNAL)


def to_status(exc: BaseException) -> grpc.StatusCode:
    return _row(exc).status


def error_code(exc: BaseException) -> str:
    return _row(exc).code


def retryable(exc: BaseException) -> bool:
    """Whether another try (or another worker) may succeed where this one failed."""
    return _row(exc).retryable


def from_code(code: str, worker: str, message: str) -> errors.OrchError:
    """The typed error for a code sent by ``worker``; the message names the worker once.

    Workers never put their own name in a message: the orchestrator knows the address it
    called, and says it here.
    """
    row = _BY_CODE.get(code, _INTERNAL)
    if issubclass(row.error, errors.WorkerError | errors.GGUFError):
        exc = row.error(f"worker {worker}", message) if issubclass(
            row.error, errors.GGUFError) else row.error(worker, message)
    else:
        exc = row.error(f"worker {worker}: {message}")
    exc.worker = worker
    return exc
