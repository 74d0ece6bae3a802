"""The orchestrator's handle on one worker: unary calls with deadlines, typed errors.

gRPC failures become our errors here and only here. A worker's own errors carry their
code (``orchcore.wire.status``) in trailing metadata and come back as the same type;
the rest are transport failures, named by gRPC status code, never by message text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc

from orchcore import __version__
from orchcore.chunks import StageResult
from orchcore.control import (
    Lease,
    LinkMeasurement,
    LoadReply,
    LoadRequest,
    ProbeResult,
    ShardReceipt,
    WorkerReport,
)
from orchcore.errors import (
    AuthError,
    MessageTooLargeError,
    OrchError,
    ProtocolMismatchError,
    WorkerError,
    WorkerUnreachableError,
)
from orchcore.probe import LayerShape
from orchcore.rangefetch import RemoteFile
from orchcore.shard import LayerRange
from orchcore.slices import ByteRange, total_bytes
from orchcore.wire import PROTOCOL_VERSION, convert
from orchcore.wire import worker_pb2_grpc as pb_grpc
from orchcore.wire.channel import Link, auth_metadata, connect, measure_link
from orchcore.wire.status import ERROR_CODE_KEY, from_code
from orchestrator.settings import OrchSettings

log = logging.getLogger(__name__)

UPLOAD_CHUNK = 256 << 10  # well under the smallest message limit a worker accepts (1 MiB)


def rpc_error(worker: str, exc: grpc.RpcError, *, answered_before: bool = False
              ) -> OrchError:
    """The typed error for a failed call to ``worker``."""
    code, details = exc.code(), exc.details() or ""
    trailers = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    if ERROR_CODE_KEY in trailers:
        return from_code(trailers[ERROR_CODE_KEY], worker, details)
    if code == grpc.StatusCode.UNAVAILABLE:
        if answered_before:
            return WorkerUnreachableError(worker, f"connection lost ({details}); is it still "
                                                  f"running?")
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


def version_problem(info: WorkerReport) -> str | None:
    """What is wrong with a worker of another protocol version, and the fix; None if none."""
    if info.protocol_version == PROTOCOL_VERSION:
        return None
    return (f"runs orch {info.software_version or '(unknown)'} (protocol "
            f"{info.protocol_version}); this orchestrator runs orch {__version__} (protocol "
            f"{PROTOCOL_VERSION}). On {info.hostname or 'that machine'}: install orch "
            f"{__version__}, then run `sudo orch worker install` (restarts the service in "
            f"place, keeping its id, token and cache)")


class ResultStream:
    """A Results stream from the last stage: ``StageResult``s, and a typed error naming the
    worker when the stream breaks."""

    def __init__(self, call: grpc.Call, worker: str) -> None:
        self._stream = call
        self._worker = worker

    def __iter__(self) -> Iterator[StageResult]:
        try:
            for msg in self._stream:
                yield convert.result_from_proto(msg)
        except grpc.RpcError as exc:
            raise rpc_error(self._worker, exc, answered_before=True) from None

    def cancel(self) -> None:
        self._stream.cancel()


class WorkerClient:
    """Connects on first use (``orchcore.wire.channel.connect``): the token goes out only
    over a link to a worker that proved it holds it."""

    def __init__(self, address: str, token: str | None, settings: OrchSettings) -> None:
        self.address = address
        self.settings = settings
        self._token = token
        self.metadata = auth_metadata(token)
        self._link: Link | None = None
        self._stub: pb_grpc.WorkerStub | None = None
        self.answered = False  # has this worker ever answered a call?

    @property
    def link(self) -> Link:
        if self._link is None:
            self._link = connect(self.address, self._token,
                                 allow_plaintext=self.settings.plaintext,
                                 timeout_s=self.settings.info_deadline_s
                                 ).require_proven(self._token)
            self._stub = pb_grpc.WorkerStub(self._link.channel)
            self.answered = True
        return self._link

    @property
    def channel(self) -> grpc.Channel:
        return self.link.channel

    @property
    def stub(self) -> pb_grpc.WorkerStub:
        self.link  # noqa: B018 (connects on first use)
        return self._stub

    def _call(self, method: Callable, request: object, deadline: float) -> object:
        try:
            reply = method(request, timeout=deadline, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise rpc_error(self.address, exc, answered_before=self.answered) from None
        self.answered = True
        return reply

    def results(self, pipeline_id: str) -> ResultStream:
        """Subscribe to the results of ``pipeline_id`` (this worker must be its last stage)."""
        call = self.stub.Results(convert.subscribe_to_proto(pipeline_id),
                                 metadata=self.metadata)
        return ResultStream(call, self.address)

    def measure_link(self, payload_bytes: int, deadline: float | None = None
                     ) -> tuple[float, float]:
        """(round-trip seconds, bytes per second) to this worker."""
        try:
            return measure_link(self.channel, self._token, payload_bytes,
                                deadline or self.settings.info_deadline_s)
        except grpc.RpcError as exc:
            raise rpc_error(self.address, exc, answered_before=self.answered) from None

    def info(self, deadline: float | None = None) -> WorkerReport:
        return convert.report_from_proto(self._call(
            self.stub.Info, convert.info_to_proto(), deadline or self.settings.info_deadline_s))

    def check_protocol(self) -> WorkerReport:
        info = self.info()
        if (problem := version_problem(info)) is not None:
            raise ProtocolMismatchError(self.address, problem)
        return info

    def upload_shard(self, path: Path, sha256: str,
                     progress: Callable[[int], None] | None = None) -> ShardReceipt:
        size = path.stat().st_size

        def blocks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while data := f.read(UPLOAD_CHUNK):
                    yield data
                    if progress:
                        progress(len(data))

        deadline = self.settings.load_deadline_s + size / (
            self.settings.upload_min_mib_s * (1 << 20))
        return convert.receipt_from_proto(self._call(
            self.stub.UploadShard, convert.upload_to_proto(sha256, size, blocks()), deadline))

    def find_shard(self, files: Sequence[RemoteFile], ranges: Sequence[ByteRange],
                   layers: LayerRange) -> ShardReceipt | None:
        """The shard this worker built before from this slice of the model, if any."""
        receipt = convert.receipt_from_proto(self._call(
            self.stub.FindShard, convert.slice_to_proto(files, ranges, layers),
            self.settings.info_deadline_s))
        return receipt if receipt.sha256 else None

    def upload_slice(self, files: Sequence[RemoteFile], ranges: Sequence[ByteRange],
                     layers: LayerRange, data: Iterator[bytes],
                     progress: Callable[[int], None] | None = None) -> ShardReceipt:
        """Send the bytes of ``ranges`` of the model's ``files``, in order (``data``); the
        worker cuts the shard of ``layers`` from them."""
        size = total_bytes(ranges)

        def blocks() -> Iterator[bytes]:
            for piece in data:
                yield piece
                if progress:
                    progress(len(piece))

        # the bytes cross once and are read and written twice there (the copy, the shard)
        deadline = self.settings.load_deadline_s + 2 * size / (
            self.settings.upload_min_mib_s * (1 << 20))
        return convert.receipt_from_proto(self._call(
            self.stub.UploadShard,
            convert.slice_upload_to_proto(files, ranges, layers, size, blocks()), deadline))

    def fetch_shard(self, files: Sequence[RemoteFile], ranges: Sequence[ByteRange],
                    layers: LayerRange, progress: Callable[[int, int], None] | None = None
                    ) -> ShardReceipt:
        """Have the worker fetch the ``ranges`` of the model's ``files`` and cut the shard
        of ``layers`` from them; ``progress(done, total)`` as bytes arrive there."""
        deadline = self.settings.load_deadline_s + total_bytes(ranges) / (
            self.settings.upload_min_mib_s * (1 << 20))
        receipt = None
        try:
            for msg in self.stub.FetchShard(convert.fetch_to_proto(files, ranges, layers),
                                            timeout=deadline, metadata=self.metadata):
                self.answered = True
                step = convert.progress_from_proto(msg)
                if progress:
                    progress(step.done, step.total)
                if step.shard is not None:
                    receipt = step.shard
        except grpc.RpcError as exc:
            raise rpc_error(self.address, exc, answered_before=self.answered) from None
        if receipt is None:
            raise WorkerError(self.address, "FetchShard ended without naming the shard")
        return receipt

    def load_shard(self, request: LoadRequest) -> LoadReply:
        return convert.load_reply_from_proto(self._call(
            self.stub.LoadShard, convert.load_to_proto(request), self.settings.load_deadline_s))

    def unload(self, pipeline_id: str, holder: str, deadline: float) -> bool:
        """Give up ``holder``'s lease; whether the pipeline was loaded there."""
        return convert.unloaded_from_proto(self._call(
            self.stub.Unload, convert.unload_to_proto(Lease(pipeline_id, holder)), deadline))

    def measure_link_to(self, address: str, payload_bytes: int, deadline: float
                        ) -> LinkMeasurement:
        return convert.link_from_proto(self._call(
            self.stub.MeasureLink, convert.measure_link_to_proto(address, payload_bytes),
            deadline))

    def probe(self, shape: LayerShape) -> ProbeResult:
        return convert.probe_result_from_proto(self._call(
            self.stub.Probe, convert.probe_to_proto(shape), self.settings.load_deadline_s))

    def rotate_token(self, new_token: str) -> float:
        """Give the worker a new cluster token; returns how long the old one still works."""
        return convert.grace_from_proto(self._call(
            self.stub.RotateToken, convert.rotate_to_proto(new_token),
            self.settings.info_deadline_s))

    def renew(self, pipeline_id: str, holder: str, deadline: float) -> bool:
        """Keep ``holder``'s lease; False when the pipeline is gone or the lease lapsed."""
        return convert.renewed_from_proto(self._call(
            self.stub.Renew, convert.renew_to_proto(Lease(pipeline_id, holder)), deadline))

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
