"""Hostile input, shared by the fuzz tests (bounded) and ``bench/fuzz.py`` (long).

Two targets:
- the GGUF readers: ``scan_header`` (headers read over HTTP) and ``read_model_facts`` with
  ``StageRole.of`` (models and the shards a worker receives), fed mutated headers of a real
  file. Every outcome must be a result or a ``GGUFError``, quickly;
- a running worker: every RPC fed random and mutated messages, with and without the token.
  Every answer must be a status we chose (never UNKNOWN or INTERNAL: those mean an
  unexpected exception), within a deadline, and the process must live on.

Messages that would send the worker out of the machine (a URL to fetch, an address to
measure or forward to) are pointed back at a closed loopback port before they are sent.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from orchcore.config import EngineConfig
from orchcore.control import LoadRequest
from orchcore.errors import GGUFError
from orchcore.facts import read_model_facts
from orchcore.ggufread import forget_parsed_headers
from orchcore.ggufscan import scan_header
from orchcore.modelgen import ModelSpec
from orchcore.shard import LayerRange, write_shard
from orchcore.stagerole import StageRole
from orchcore.wire import worker_pb2 as pb
from orchcore.wire.channel import auth_metadata
from orchestrator.cluster.client import WorkerClient
from orchestrator.settings import OrchSettings
from testkit.models import generated_model

SERVICE = pb.DESCRIPTOR.services_by_name["Worker"]
CLOSED = "127.0.0.1:9"  # discard port, nothing listens: where outward targets are sent
# What a worker may answer hostile input with: our typed errors' codes, and gRPC's own.
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
           grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ABORTED,
           grpc.StatusCode.CANCELLED}


def mutate(data: bytes, rng: random.Random, edits: int = 4) -> bytes:
    """``data`` with a few random byte flips, insertions, deletions, repeats or a cut."""
    out = bytearray(data)
    for _ in range(rng.randint(1, edits)):
        kind = rng.randrange(6)
        at = rng.randrange(len(out) + 1)
        if kind == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif kind == 2:
            del out[at:at + rng.randint(1, 16)]
        elif kind == 3 and out:  # a big number where a length or count goes
            width = rng.choice((4, 8))
            out[at:at + width] = rng.choice((b"\xff", b"\x7f", b"\x80")) * width
        elif kind == 4:
            chunk = out[at:at + rng.randint(1, 32)]
            out[at:at] = chunk * rng.randint(1, 4)
        elif kind == 5:
            del out[at:]
    return bytes(out)


# --- the GGUF readers --------------------------------------------------------------------

def check_header(data: bytes, folder: Path, name: str) -> str:
    """Feed ``data`` to the header readers; returns 'ok' or 'refused'. Anything but a
    result or a ``GGUFError`` propagates: that is a finding."""
    scan_header(data)
    path = folder / name
    path.write_bytes(data)
    forget_parsed_headers()
    try:
        StageRole.of(read_model_facts(path))
    except GGUFError:
        return "refused"
    finally:
        path.unlink()
    return "ok"


# --- the worker's RPCs -------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    name: str
    request: type
    request_streaming: bool
    response_streaming: bool

    @property
    def path(self) -> str:
        return f"/{SERVICE.full_name}/{self.name}"


def methods() -> list[Method]:
    streaming = {"UploadShard": (True, False), "FetchShard": (False, True),
                 "Forward": (True, False), "Results": (False, True)}
    return [Method(m.name, getattr(pb, m.input_type.name), *streaming.get(m.name, (False, False)))
            for m in SERVICE.methods]


PIPELINE = "fuzz"  # the pipeline ``load_stage`` loads: seeds name it, to reach real work
N_EMBD = 64  # the generated model's width


def load_stage(address: str, token: str, settings: OrchSettings, folder: Path) -> str:
    """Load the last layer of a small generated model as the last stage of ``PIPELINE`` on
    the worker at ``address`` (so Forward, Results, Renew... meet a live stage); returns
    the shard's sha256."""
    model = generated_model(ModelSpec(n_layers=2, n_embd=N_EMBD, n_vocab=300), "fuzz.gguf")
    shard = write_shard(model, LayerRange(1, 2), folder / "fuzz-shard.gguf")
    client = WorkerClient(address, token, settings)
    try:
        client.upload_shard(shard.path, shard.sha256)
        client.load_shard(LoadRequest(
            pipeline_id=PIPELINE, sha256=shard.sha256, layer_start=1, layer_end=2,
            stage_index=1, stage_count=2, holder="fuzz",
            engine=EngineConfig(context_tokens=256, max_sessions=4, batch_tokens=64)))
    finally:
        client.close()
    return shard.sha256


def seeds(token: str, sha: str = "ab" * 32) -> dict[str, list[bytes]]:
    """Valid requests of each method, to mutate from."""
    hidden = pb.Hidden(codec="f32", rows=3, cols=N_EMBD, data=bytes(3 * N_EMBD * 4))
    slice_ = pb.ShardSlice(files=[pb.SourceFile(name="m.gguf", size=1 << 20, etag="1-2")],
                           ranges=[pb.ByteRange(part=0, offset=0, length=1 << 10)],
                           layer_start=0, layer_end=1)
    messages = {
        "Info": [pb.InfoRequest()],
        "UploadShard": [pb.ShardChunk(sha256=sha, size=1 << 40), pb.ShardChunk(data=b"x" * 64),
                        pb.ShardChunk(slice=slice_, size=1 << 10)],
        "FindShard": [slice_],
        "FetchShard": [pb.FetchShardRequest(
            files=[pb.SourceFile(url=f"http://{CLOSED}/m.gguf", size=1 << 50, etag='"e"')],
            ranges=[pb.ByteRange(part=0, offset=0, length=1 << 40)],
            layer_start=0, layer_end=1 << 20)],
        "LoadShard": [pb.LoadShardRequest(
            pipeline_id="p", sha256=sha, layer_start=0, layer_end=4, stage_index=0,
            stage_count=2, next_address=CLOSED, holder="h",
            engine=pb.EngineSettings(context_tokens=1 << 30, max_sessions=1 << 20,
                                     batch_tokens=1 << 20, threads=1 << 20))],
        "Unload": [pb.UnloadRequest(pipeline_id="other", holder="h")],
        "Forward": [pb.StageInput(
            pipeline_id=PIPELINE, session="s", chunk=1, start_pos=1 << 31, tokens=[1, 2, 3],
            hidden=pb.Hidden(codec="f32", rows=1 << 30, cols=1 << 30, data=b"\0" * 32),
            want_token=True, sampling=pb.Sampling(top_k=-1, seed=1 << 63)),
            pb.StageInput(pipeline_id=PIPELINE, session="s", chunk=1, start_pos=0,
                          tokens=[1, 2, 3], hidden=hidden, want_token=True,
                          sampling=pb.Sampling(temperature=0.7, top_k=40, top_p=0.9)),
            pb.StageInput(pipeline_id=PIPELINE, session="t", chunk=2, start_pos=0,
                          tokens=[5], hidden=pb.Hidden(codec="q8_0", rows=1, cols=N_EMBD,
                                                       data=bytes(68)),
                          want_token=True, sampling=pb.Sampling())],
        "Results": [pb.ResultsRequest(pipeline_id=PIPELINE)],
        "EndSession": [pb.EndSessionRequest(session="s")],
        "Prove": [pb.ProveRequest(nonce=b"n" * 32)],
        "Renew": [pb.RenewRequest(pipeline_id=PIPELINE, holder="fuzz")],
        "Ping": [pb.PingRequest(payload=b"p" * 64)],
        "MeasureLink": [pb.MeasureLinkRequest(address=CLOSED, payload_bytes=1 << 31)],
        "Probe": [pb.ProbeRequest(arch="llama", n_embd=1 << 16, n_ff=1 << 18, n_head=1,
                                  n_head_kv=1, weight_type=2, layer_bytes=1 << 40),
                  pb.ProbeRequest(arch="llama", n_embd=96, n_ff=100, n_head=7, n_head_kv=3,
                                  weight_type=999, layer_bytes=1)],
        "RotateToken": [pb.RotateTokenRequest(new_token=token)],
    }
    return {name: [m.SerializeToString() for m in msgs] for name, msgs in messages.items()}


def keep_home(method: Method, data: bytes, token: str) -> bytes:
    """``data``, with anything that would reach beyond loopback pointed at ``CLOSED``, and
    a token rotation kept to the same token (so the run keeps its credential)."""
    try:
        msg = method.request.FromString(data)
    except Exception:  # undecodable: the worker will refuse it as it is
        return data
    changed = False
    for f in getattr(msg, "files", ()) if isinstance(msg, pb.FetchShardRequest) else ():
        f.url, changed = f"http://{CLOSED}/m.gguf", True
    if isinstance(msg, pb.MeasureLinkRequest) and msg.address:
        msg.address, changed = CLOSED, True
    if isinstance(msg, pb.LoadShardRequest) and msg.next_address:
        msg.next_address, changed = CLOSED, True
    if isinstance(msg, pb.RotateTokenRequest):
        msg.new_token, changed = token, True
    return msg.SerializeToString() if changed else data


@dataclass
class Tally:
    calls: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    slowest_s: float = 0.0


def call_raw(channel: grpc.Channel, method: Method, bodies: list[bytes], token: str | None,
             deadline_s: float, tally: Tally) -> None:
    """One call of ``method`` with raw request bodies; the outcome is added to ``tally``."""
    ident: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    kind = {(False, False): channel.unary_unary, (True, False): channel.stream_unary,
            (False, True): channel.unary_stream, (True, True): channel.stream_stream}
    call = kind[(method.request_streaming, method.response_streaming)](
        method.path, request_serializer=ident, response_deserializer=ident)
    request = iter(bodies) if method.request_streaming else bodies[0]
    started = time.monotonic()
    try:
        answer = call(request, timeout=deadline_s, metadata=auth_metadata(token))
        if method.response_streaming:
            for _ in answer:
                if time.monotonic() - started > deadline_s:
                    answer.cancel()
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
        if code not in ALLOWED:
            tally.findings.append(f"{method.name}: {code.name} {exc.details()!r} for "
                                  f"{[b[:80] for b in bodies]!r}")
    elapsed = time.monotonic() - started
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and method.name != "Results":
        # (Results is a subscription: it stays open by design, until its deadline.)
        tally.findings.append(f"{method.name}: no answer in {deadline_s} s (a hang) for "
                              f"{[b[:80] for b in bodies]!r}")
    tally.calls += 1
    tally.codes[code.name] = tally.codes.get(code.name, 0) + 1
    tally.slowest_s = max(tally.slowest_s, elapsed)
