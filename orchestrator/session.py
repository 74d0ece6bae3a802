"""The session API: a model opened on workers, generating events. No terminal output.

    cluster = Cluster.connect(addresses, token, settings)     # orchestrator/cluster.py
    plan = make_plan(facts, cluster.devices, options)         # pure; show it
    with cluster.open(plan, facts, tokenizer, store) as model:
        for event in model.generate("Hi", sampling, stops=["\\n"], max_tokens=64):
            ...  # TextPiece(text) ... then one Finished(reason, stats, session)

A ``Session`` owns its token history: the prompt in the chunks it was sent in, then each
generated token; and its sampling parameters with the concrete seed and the number of
draws, which is enough to rebuild the last stage's sampler elsewhere. ``orch run`` only
renders events; the HTTP server and failover build on the same objects.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from orchcore.errors import ContextFullError, InvalidInputError, OrchError
from orchcore.sampling import RANDOM_SEED, SamplingParams
from orchcore.wire import worker_pb2 as pb
from orchestrator.datapath import DataPath
from orchestrator.deploy import Deployment, undeploy
from orchestrator.plan import Plan
from orchestrator.settings import OrchSettings
from orchestrator.speeds import MIN_DECODE_TOKENS, SpeedBook
from orchestrator.tokenizer import StopMatcher, StreamDecoder, Tokenizer

log = logging.getLogger(__name__)

FinishReason = Literal["length", "stop", "end"]  # max tokens or context; stop text; EOG


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    first_token_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    compute_ms: dict[int, float] = field(default_factory=dict)  # per stage, decode steps
    wire_bytes: dict[int, int] = field(default_factory=dict)  # per hop, decode steps

    def add_decode(self, timings: Sequence[pb.StageTiming]) -> None:
        for t in timings:
            self.compute_ms[t.stage_index] = self.compute_ms.get(t.stage_index, 0) + t.compute_ms
            if t.sent_bytes:
                self.wire_bytes[t.stage_index] = (self.wire_bytes.get(t.stage_index, 0)
                                                  + t.sent_bytes)


@dataclass
class Session:
    """One answer's state: what entered the model, in its batch shapes, and the sampler's."""

    id: str
    sampling: SamplingParams  # seed concrete: a random seed is drawn once, here
    prompt_chunks: list[tuple[int, ...]] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    draws: int = 0  # tokens the last stage's sampler has drawn

    @property
    def prompt(self) -> list[int]:
        return [t for chunk in self.prompt_chunks for t in chunk]

    @property
    def length(self) -> int:
        """Positions this session holds in every stage's KV cache."""
        return sum(len(c) for c in self.prompt_chunks) + max(0, len(self.generated) - 1)


@dataclass(frozen=True)
class TextPiece:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    stats: GenerationStats
    session: Session


Event = TextPiece | Finished
Prompt = str | Sequence[Mapping[str, str]]


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt, context_tokens: int, *,
                  chat: bool = True) -> list[int]:
    """Token ids of a text, or of chat messages through the model's template; refused
    before anything is sent when empty or longer than the context."""
    if isinstance(prompt, str):
        tokens = tokenizer.encode(prompt)
    elif chat and tokenizer.chat_template:
        tokens = tokenizer.encode_chat(prompt)
    else:
        tokens = tokenizer.encode(prompt[-1]["content"] if prompt else "")
    check_prompt(tokens, context_tokens)
    return tokens


def check_prompt(tokens: Sequence[int], context_tokens: int) -> None:
    if not tokens:
        raise InvalidInputError("the prompt is empty: give some text")
    if len(tokens) >= context_tokens:
        raise ContextFullError(
            f"the prompt has {len(tokens)} tokens but the context holds {context_tokens}; "
            f"shorten it or raise --context")


class RunningModel:
    """A model deployed on workers; ``generate`` yields events; ``close`` unloads it."""

    def __init__(self, plan: Plan, tokenizer: Tokenizer, path: DataPath,
                 settings: OrchSettings, deployment: Deployment) -> None:
        self.plan = plan
        self.tokenizer = tokenizer
        self.path = path
        self.settings = settings
        self.deployment = deployment
        self._closed = threading.Event()
        self._renewer = threading.Thread(target=self._renew_leases, name="leases", daemon=True)
        self._renewer.start()

    def _renew_leases(self) -> None:
        """Keep our leases on the stages for as long as the model is open (days, for a
        server); a lease lapses about 30 s after we are gone."""
        while not self._closed.wait(self.settings.lease_renew_s):
            for client in self.path.clients:
                if client.address in self.path.failed:
                    continue
                try:
                    if not client.renew(self.path.pipeline_id, self.deployment.holder,
                                        self.settings.probe_deadline_s):
                        log.warning("worker %s no longer holds our stage", client.address)
                except OrchError as exc:
                    log.debug("renewing the lease on %s: %s", client.address, exc)

    def encode(self, prompt: Prompt, *, chat: bool = True) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.plan.context_tokens, chat=chat)

    def new_session(self, sampling: SamplingParams) -> Session:
        if sampling.seed == RANDOM_SEED and not sampling.greedy:
            sampling = replace(sampling, seed=secrets.randbelow(RANDOM_SEED))
        return Session(uuid.uuid4().hex[:12], sampling)

    def generate(self, prompt: Prompt, sampling: SamplingParams | None = None, *,
                 stops: Sequence[str] = (), max_tokens: int | None = None,
                 chat: bool = True, stats: GenerationStats | None = None) -> Iterator[Event]:
        """Text pieces of the answer, then one ``Finished``. ``stats`` (filled as the answer
        goes) lets a caller watch it live."""
        tokens = self.encode(prompt, chat=chat)
        session = self.new_session(sampling or self.settings.sampling())
        stats = stats or GenerationStats()
        stats.prompt_tokens = len(tokens)
        stops_at = StopMatcher(stops)
        decoder = StreamDecoder(self.tokenizer)
        reason: FinishReason = "length"
        for token in self.stream(session, tokens, max_tokens, stats):
            if self.tokenizer.is_end_of_generation(token):
                reason = "end"
                break
            text, stopped = stops_at.feed(decoder.feed(token))
            if text:
                yield TextPiece(text)
            if stopped:
                reason = "stop"
                break
        if reason != "stop":
            tail, _ = stops_at.feed(decoder.flush())
            if tail := tail + stops_at.flush():
                yield TextPiece(tail)
        yield Finished(reason, stats, session)

    def stream(self, session: Session, prompt: Sequence[int], max_tokens: int | None = None,
               stats: GenerationStats | None = None) -> Iterator[int]:
        """Sampled token ids for ``prompt`` (token ids), at most ``max_tokens`` and never past
        the context; ends the session when the caller stops iterating."""
        context = self.plan.context_tokens
        check_prompt(prompt, context)
        limit = min(max_tokens or self.settings.max_tokens, context - len(prompt))
        try:
            yield from self._tokens(session, list(prompt), limit, stats or GenerationStats())
        finally:
            self.end(session)

    def _tokens(self, session: Session, prompt: list[int], limit: int,
                stats: GenerationStats) -> Iterator[int]:
        """Sampled token ids: the prompt's chunks all in flight at once, then one by one."""
        path, size = self.path, self.plan.batch_tokens
        started = time.perf_counter()
        chunk = 0
        for start in range(0, len(prompt), size):
            part = tuple(prompt[start:start + size])
            last = start + size >= len(prompt)
            chunk = path.send(session.id, start, part, want_token=last,
                              sampling=session.sampling if start == 0 else None)
            session.prompt_chunks.append(part)
        out = path.wait(session.id, chunk)
        stats.prompt_s = stats.first_token_s = time.perf_counter() - started
        for produced in range(limit):
            session.draws += 1
            session.generated.append(out.token)
            yield out.token
            if produced + 1 == limit:
                break
            t0 = time.perf_counter()
            out = path.wait(session.id, path.send(session.id, session.length, [out.token],
                                                  want_token=True))
            stats.decode_s += time.perf_counter() - t0
            stats.decode_tokens += 1
            stats.add_decode(out.timings)

    def record_speeds(self, stats: GenerationStats, book: SpeedBook, shape_key: str) -> None:
        """Keep each stage's measured time per layer, for the next plan."""
        n = stats.decode_tokens
        if n < MIN_DECODE_TOKENS:
            return
        for stage in self.plan.stages:
            if stage.index in stats.compute_ms:
                book.record(stage.device.worker_id, shape_key,
                            stats.compute_ms[stage.index] / 1e3 / n / len(stage.layers))

    def end(self, session: Session) -> None:
        with contextlib.suppress(OrchError):  # a broken pipeline: closing it frees all
            self.path.end_session(session.id)

    def close(self) -> None:
        """Close the streams and unload every stage, skipping workers found dead or hung."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.path.close()
        undeploy(self.deployment, self.path.clients, self.settings.cleanup_deadline_s,
                 skip=self.path.failed)

    def __enter__(self) -> RunningModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
