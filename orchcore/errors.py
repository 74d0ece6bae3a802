"""Typed errors shared by the orchestrator and the workers.

Every error is raised where the problem is detected and carries what a user needs to act:
the file, the worker, the numbers. The gRPC boundary maps these types to status codes in
one table (``orchcore.wire.status``); nothing else converts them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pydantic import ValidationError


class OrchError(Exception):
    """Base of every error this project raises on purpose."""

    worker: str | None = None  # the worker that raised it, when it came over the wire


# --- model files -----------------------------------------------------------------------


class GGUFError(OrchError):
    """A file cannot be used as a GGUF model. Names the file and the problem."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class NotGGUFError(GGUFError):
    """The file is not a GGUF file at all (wrong magic, empty, a directory...)."""


class TruncatedGGUFError(GGUFError):
    """The file ends before its header or its tensor data does (interrupted download?)."""


class CorruptGGUFError(GGUFError):
    """The header parses but contradicts itself or the file (bad counts, bad offsets)."""


class UnsupportedModelError(GGUFError):
    """A valid GGUF this project cannot split exactly (architecture, missing metadata)."""


class InvalidSettingError(OrchError, ValueError):
    """A setting or option outside its allowed range (names it and the range)."""


class ClusterTokenError(InvalidSettingError):
    """A cluster token that breaks the rule of ``orchcore.clustertoken``; says how to make one."""


class ModelNotFoundError(OrchError, LookupError):
    """A model name that is neither known nor an existing file."""


class ModelFetchError(OrchError):
    """A known model could not be fetched or failed verification."""


class SourceFetchError(ModelFetchError):
    """Bytes of a published model could not be fetched from where it is published (no route,
    refused, cut too often, or the file changed since it was planned)."""


class NoRangeError(SourceFetchError):
    """The server sends whole files only: no part of the model can be fetched alone."""


class SourceChangedError(SourceFetchError):
    """The published file is no longer the version being fetched (its ETag or size moved)."""


class LayerRangeError(OrchError, ValueError):
    """A layer range outside ``[0, n_layers)`` or empty."""


# --- engine ------------------------------------------------------------------------------


class EngineError(OrchError):
    """The stage engine failed; subclasses say how."""


class ShardLoadError(EngineError):
    """llama.cpp refused to load a shard (its log line is in the message)."""


class ContextFullError(EngineError):
    """A session has no room left in its KV cache (context length reached)."""


class InvalidInputError(EngineError, ValueError):
    """Forward input of the wrong kind or shape for this stage."""


class ComputeError(EngineError):
    """llama_decode failed while computing the graph."""


class SessionError(EngineError):
    """Unknown session, or no free session slot."""


class NotLoadedError(EngineError):
    """A data-path call for a pipeline this worker does not hold (unloaded, replaced)."""


class ShardMissingError(EngineError):
    """Loading a shard the worker has not received (upload it first)."""


class StageFaultError(OrchError):
    """A stage failed outside its engine (publishing a result, sending to the next stage,
    a bug); the stage reports it instead of going silent."""


# --- cluster ---------------------------------------------------------------------------


class WorkerError(OrchError):
    """A worker failed or refused; names the worker and says what to do."""

    def __init__(self, worker: str, message: str) -> None:
        self.worker = worker
        self.reason = message
        super().__init__(f"worker {worker}: {message}")


class WorkerUnreachableError(WorkerError):
    """No answer from the worker (down, wrong address, firewall)."""


class AuthError(WorkerError):
    """The worker refused the cluster token."""


class ProtocolMismatchError(WorkerError):
    """The worker speaks another protocol version."""


class ShardHashError(OrchError):
    """Received shard bytes do not hash to the announced sha256."""


class WorkerBusyError(OrchError):
    """The worker runs a stage for another orchestrator, whose lease is live."""


class CacheFullError(OrchError):
    """A shard does not fit the worker's shard cache limit."""


class DiskFullError(OrchError):
    """Not enough free disk for what is about to be written (or the process's file size
    limit): names the machine (on the orchestrator's side), the file or folder, the bytes
    needed and the bytes free."""


class MemoryBudgetError(OrchError):
    """Loading would exceed the worker's memory budget (numbers in the message)."""


class MessageTooLargeError(OrchError):
    """A message exceeds the configured gRPC size limit."""


class PlanError(OrchError):
    """No plan fits the model on the given workers; says what is missing, in numbers."""


class ServiceInstallError(OrchError):
    """Installing or removing the systemd service failed; names the file or command."""


# --- Raspberry Pi images ---------------------------------------------------------------


class ImageError(OrchError):
    """A disk image, boot folder or secret file cannot be prepared for a node's first boot;
    names the file and what to do."""


class PublishError(OrchError):
    """The wheels a node installs from the LAN cannot be published or fetched; names the
    wheel or the address and what to do."""


def describe_validation(exc: ValidationError, names: Mapping[str, str] | None = None) -> str:
    """Pydantic's errors as one line per setting: 'context_tokens: ...', or with ``names``
    (field -> what the user wrote: a flag, a variable) '--context: ...'."""
    names = names or {}
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if loc:
            loc[0] = names.get(loc[0], loc[0])
        where = ".".join(loc) or "settings"
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message} (got {err.get('input')!r})")
    return "; ".join(lines)
