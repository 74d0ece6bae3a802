"""The orchestrator's handle on one worker: unary calls with deadlines, typed errors.

gRPC failures become our errors here and only here, each naming the worker and saying
what to do next.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from orchestrator.errors import (
    AuthError,
    MessageTooLargeError,
    OrchError,
    ProtocolMismatchError,
    WorkerError,
    WorkerUnreachableError,
)
from orchestrator.wire import PROTOCOL_VERSION
from orchestrator.wire import worker_pb2 as pb
from orchestrator.wire import worker_pb2_grpc as pb_grpc
from orchestrator.wire.status import ERROR_CODE_KEY, from_code
from worker.stage import auth_metadata, channel_options

log = logging.getLogger(__name__)

INFO_DEADLINE_S = 5.0
LOAD_DEADLINE_S = 300.0
UPLOAD_CHUNK = 256 << 10  # well under the smallest message limit a worker accepts (1 MiB)


def rpc_error(worker: str, exc: grpc.RpcError) -> OrchError:
    """The typed error for a failed call to ``worker``.

    A worker's own errors carry their code (``orchestrator.wire.status``) in trailing
    metadata and come back as the same type; the rest are transport failures.
    """
    code, details = exc.code(), exc.details() or ""
    trailers = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    if ERROR_CODE_KEY in trailers:
        return from_code(trailers[ERROR_CODE_KEY], worker, details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return WorkerUnreachableError(worker, f"unreachable ({details}); is `orch worker` "
                                              f"running there and the port open?")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return WorkerUnreachableError(worker, "did not answer in time; it may be overloaded "
                                              "or hung: check its log")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthError(worker, details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # gRPC's own size limit
        return MessageTooLargeError(f"worker {worker}: {details}; raise --max-message-mb "
                                    f"on the workers")
    if code == grpc.StatusCode.CANCELLED:
        return WorkerUnreachableError(worker, f"connection lost ({details})")
    return WorkerError(worker, f"{code.name}: {details}")


class WorkerClient:
    def __init__(self, address: str, token: str | None, max_message_bytes: int = 64 << 20
                 ) -> None:
        self.address = address
        self.metadata = auth_metadata(token)
        self.channel = grpc.insecure_channel(address, options=channel_options(
            max_message_bytes))
        self.stub = pb_grpc.WorkerStub(self.channel)

    def _call(self, method: Callable, request: object, deadline: float) -> object:
        try:
            return method(request, timeout=deadline, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise rpc_error(self.address, exc) from None

    def info(self, deadline: float = INFO_DEADLINE_S) -> pb.WorkerInfo:
        return self._call(self.stub.Info, pb.InfoRequest(), deadline)

    def check_protocol(self) -> pb.WorkerInfo:
        info = self.info()
        if info.protocol_version != PROTOCOL_VERSION:
            raise ProtocolMismatchError(
                self.address, f"speaks protocol {info.protocol_version}, this orchestrator "
                              f"speaks {PROTOCOL_VERSION}; install the same orch version on "
                              f"every machine")
        return info

    def upload_shard(self, path: Path, sha256: str,
                     progress: Callable[[int], None] | None = None) -> pb.ShardReceipt:
        size = path.stat().st_size

        def chunks() -> Iterator[pb.ShardChunk]:
            yield pb.ShardChunk(sha256=sha256, size=size)
            with path.open("rb") as f:
                while data := f.read(UPLOAD_CHUNK):
                    yield pb.ShardChunk(data=data)
                    if progress:
                        progress(len(data))

        deadline = LOAD_DEADLINE_S + size / (1 << 20)  # at least 1 MiB/s
        return self._call(self.stub.UploadShard, chunks(), deadline)

    def load_shard(self, request: pb.LoadShardRequest) -> pb.LoadShardReply:
        return self._call(self.stub.LoadShard, request, LOAD_DEADLINE_S)

    def unload(self, pipeline_id: str) -> pb.UnloadReply:
        return self._call(self.stub.Unload, pb.UnloadRequest(pipeline_id=pipeline_id),
                          INFO_DEADLINE_S * 6)

    def end_session(self, session: str) -> pb.EndSessionReply:
        return self._call(self.stub.EndSession, pb.EndSessionRequest(session=session),
                          INFO_DEADLINE_S)

    def close(self) -> None:
        self.channel.close()


def data_path_error(error: pb.Error) -> OrchError:
    return from_code(error.code, error.worker, error.message)
