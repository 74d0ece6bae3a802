"""The session API: a model opened on workers, generating events. No terminal output.

    cluster = Cluster.connect(addresses, token, settings)     # orchestrator/pipeline/connected.py
    plan = make_plan(facts, cluster.devices, options)         # pure; show it
    with cluster.open(plan, facts, tokenizer, store) as model:
        for event in model.generate("Hi", sampling, stops=["\\n"], max_tokens=64):
            ...  # TextPiece(text) ... then one Finished(reason, stats, session)
                 # (a Failover notice in between if a worker failed and the answer went on)

A ``Session`` owns its token history: the prompt in the chunks it was sent in, then each
decode pass (its pending token, the drafts it carried and the tokens its verdict added);
and its sampling parameters with the concrete seed, which is enough to rebuild the last
stage's KV caches and sampler elsewhere. With speculation (``Speculator``) a pass may add
several tokens. ``orch run`` only
renders events; the HTTP server builds on the same objects.

Failover: when a step fails with an error another pipeline may not have (a dead, hung or
faulty worker: ``failover.calls_for_failover``), the model is planned again without that
worker (``Replanner``, from the cluster), deployed, and every live session is replayed onto
the new pipeline (``failover.replay``); the failed step is then retried and the answer goes
on after one ``Failover`` event. Steps hold ``StepGate`` shared and record their token
inside it; a failover holds it exclusively, so it sees every session between steps. A
worker left out answers again: the next answer (with no session live) is planned with it.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np

from orchcore.chunks import NO_TOKEN, StageResult
from orchcore.errors import ContextFullError, InvalidInputError, OrchError, PlanError
from orchcore.facts import ModelFacts
from orchcore.sampling import RANDOM_SEED, SamplingParams
from orchestrator.pipeline import prompt as prompting
from orchestrator.pipeline.datapath import DataPath
from orchestrator.pipeline.deploy import Deployment, undeploy
from orchestrator.pipeline.drafting import HostDraft
from orchestrator.pipeline.embedding import Pooling, final_rows, pool
from orchestrator.pipeline.events import Event, Failover, Finished, FinishReason, TextPiece
from orchestrator.pipeline.failover import Pipeline, Replanner, calls_for_failover, replay
from orchestrator.pipeline.ring import TokenRing
from orchestrator.pipeline.sessionstate import GenerationStats, Session
from orchestrator.pipeline.speculation import Pass, Speculator, measure_costs
from orchestrator.pipeline.stepgate import StepGate
from orchestrator.planning.plan import Plan
from orchestrator.planning.speeds import SpeedBook
from orchestrator.settings import OrchSettings
from orchestrator.text.tokenizer import StopMatcher, StreamDecoder, Tokenizer

__all__ = ["Failover", "Finished", "GenerationStats", "RunningModel", "Session", "TextPiece"]

log = logging.getLogger(__name__)

MAX_FAILOVERS = 3  # consecutive failovers for one step before its error is raised
Prompt = str | Sequence[Mapping[str, str]] | Sequence[int]  # text, messages or token ids


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt, context_tokens: int, *,
                  chat: bool = True) -> list[int]:
    """Token ids of a text, or of chat messages through the model's template (or the token
    ids given); refused before anything is sent when empty or longer than the context."""
    if not isinstance(prompt, str) and all(isinstance(t, int) for t in prompt):
        tokens = list(prompt)  # type: ignore[arg-type]
        tokenizer.check_ids(tokens)
    elif isinstance(prompt, str):
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
    """A model deployed on workers; ``generate`` yields events; ``close`` unloads it.

    With a ``replanner`` a failed worker is replaced mid-answer (see the module's doc).
    ``draft``: the draft model of ``--speculate draft:MODEL``, opened (and closed) by the
    caller."""

    def __init__(self, plan: Plan, tokenizer: Tokenizer, path: DataPath,
                 settings: OrchSettings, deployment: Deployment,
                 replanner: Replanner | None = None, pooling: Pooling | None = "mean",
                 draft: HostDraft | None = None) -> None:
        self.plan = plan
        self.pooling = pooling  # how embeddings are pooled; None: the model has none
        self.first_plan = plan  # what a full cluster runs: workers that come back rejoin it
        self.tokenizer = tokenizer
        self.path = path
        self.settings = settings
        self.deployment = deployment
        self.replanner = replanner
        self._live: dict[str, Session] = {}
        self._gate = StepGate()
        self._epoch = 0  # pipelines deployed since open: a failure of an older one is moot
        self._failing_over = threading.Lock()
        self._excluded: dict[str, Deployment] = {}  # failed worker -> the pipeline it held
        self._returned: set[str] = set()  # excluded workers that answer again
        self._closed = threading.Event()
        self.speculator = Speculator(settings.speculation(), draft=draft)
        self._measuring = threading.Lock()
        self._renewer = threading.Thread(target=self._renew_leases, name="leases", daemon=True)
        self._renewer.start()

    def _renew_leases(self) -> None:
        """Keep our leases on the stages for as long as the model is open (days, for a
        server); a lease lapses about 30 s after we are gone. Workers left out after a
        failure are asked whether they answer again."""
        while not self._closed.wait(self.settings.lease_renew_s):
            if self._failing_over.locked():  # the stages are being replaced: not ours now
                continue
            path, deployment = self.path, self.deployment
            for client in path.clients:
                if client.address in path.failed:
                    continue
                try:
                    if not client.renew(path.pipeline_id, deployment.holder,
                                        self.settings.probe_deadline_s):
                        log.warning("worker %s no longer holds our stage", client.address)
                except OrchError as exc:
                    log.debug("renewing the lease on %s: %s", client.address, exc)
            for address in list(self._excluded):
                with contextlib.suppress(OrchError):
                    self.replanner.client(address).info(self.settings.probe_deadline_s)
                    self._returned.add(address)

    def encode(self, prompt: Prompt, *, chat: bool = True) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.plan.context_tokens, chat=chat)

    def new_session(self, sampling: SamplingParams) -> Session:
        if sampling.seed == RANDOM_SEED and not sampling.greedy:
            sampling = replace(sampling, seed=secrets.randbelow(RANDOM_SEED))
        return Session(uuid.uuid4().hex[:12], sampling)

    def generate(self, prompt: Prompt, sampling: SamplingParams | None = None, *,
                 stops: Sequence[str] = (), max_tokens: int | None = None,
                 chat: bool = True, stats: GenerationStats | None = None,
                 special: bool = False, session: Session | None = None) -> Iterator[Event]:
        """Text pieces of the answer, then one ``Finished``. ``stats`` (filled as the answer
        goes) lets a caller watch it live. ``special``: control tokens the model writes
        (not the one that ends it) appear as their text, for a parser of tool calls.
        ``session``: one made by ``fork`` (or ``new_session``) for this prompt."""
        tokens = self.encode(prompt, chat=chat)
        session = session or self.new_session(sampling or self.settings.sampling())
        stats = stats or GenerationStats()
        stats.prompt_tokens = len(tokens)
        stops_at = StopMatcher(stops)
        decoder = StreamDecoder(self.tokenizer, special=special)
        reason: FinishReason = "length"
        shown = 0  # generated tokens whose text has been yielded

        def piece(text: str) -> TextPiece:
            nonlocal shown
            upto = len(session.generated) - (reason == "end")  # not the token that ends it
            out = TextPiece(text, tuple(session.generated[shown:upto]),
                            tuple(session.scores[shown:upto]))
            shown = upto
            return out

        with contextlib.closing(self.steps(session, tokens, max_tokens, stats)) as steps:
            for token in steps:
                if isinstance(token, Failover):
                    yield token
                    continue
                if self.tokenizer.is_end_of_generation(token):
                    reason = "end"
                    break
                text, stopped = stops_at.feed(decoder.feed(token))
                if text:
                    yield piece(text)
                if stopped:
                    reason = "stop"
                    break
        if reason != "stop":
            tail, _ = stops_at.feed(decoder.flush())
            if tail := tail + stops_at.flush():
                yield piece(tail)
        yield Finished(reason, stats, session)

    def stream(self, session: Session, prompt: Sequence[int], max_tokens: int | None = None,
               stats: GenerationStats | None = None) -> Iterator[int]:
        """Sampled token ids for ``prompt`` (token ids), at most ``max_tokens`` and never past
        the context; ends the session when the caller stops iterating."""
        with contextlib.closing(self.steps(session, prompt, max_tokens, stats)) as steps:
            for item in steps:
                if not isinstance(item, Failover):
                    yield item

    def steps(self, session: Session, prompt: Sequence[int], max_tokens: int | None = None,
              stats: GenerationStats | None = None) -> Iterator[int | Failover]:
        """``stream``, with a ``Failover`` wherever the answer went on after a failure."""
        context = self.plan.context_tokens
        check_prompt(prompt, context)
        limit = min(self.settings.max_tokens if max_tokens is None else max_tokens,
                    context - len(prompt))
        self._rejoin()
        self._measure_costs()
        prompting.wait_for_share(session, self.settings.step_deadline_s)
        with self._failing_over:
            self._live[session.id] = session
        try:
            yield from self._tokens(session, list(prompt), limit, stats or GenerationStats())
        finally:
            if session.share is not None:
                session.share.finish(sent=False)  # never sent: the copies send it whole
            with self._failing_over:
                self._live.pop(session.id, None)
            self.end(session)
            self.speculator.finished(session)

    def fork(self, prompt: Sequence[int], samplings: Sequence[SamplingParams], *,
             score_prompt: bool = False) -> list[Session]:
        """Sessions for n answers to one ``prompt`` (token ids), one per sampling parameters
        (each its own seed): the prompt is prefilled once and every stage copies its KV
        cache to the others (``prompting``). Each then goes through ``generate``."""
        sessions = [self.new_session(s) for s in samplings]
        for session in sessions:
            session.score_prompt = score_prompt
        prompting.share(prompt, self._chunk_size(len(prompt), score_prompt), sessions)
        return sessions

    def embed(self, tokens: Sequence[int]) -> np.ndarray:
        """The pooled final-norm hidden state of ``tokens`` (float64, not normalized),
        computed through the stages as one short-lived session."""
        if self.pooling is None:
            raise InvalidInputError("this model has no embeddings (its GGUF says it ranks)")
        check_prompt(tokens, self.plan.context_tokens)
        session = Session(uuid.uuid4().hex[:12], SamplingParams())
        try:
            with self._gate.shared():
                rows = final_rows(self.path, session.id, list(tokens),
                                  self.plan.stages[-1].engine.output_rows)
        finally:
            self.end(session)
        return pool(rows, self.pooling)

    def _chunk_size(self, n_tokens: int, scored: bool) -> int:
        """Prompt chunks' size: with scored rows, at most the last stage's output rows."""
        size = self.plan.prompt_chunk(n_tokens)
        return min(size, self.plan.stages[-1].engine.output_rows) if scored else size

    def _measure_costs(self) -> None:
        """Once, before the first answer of ``auto``: this pipeline's batch costs."""
        with self._measuring:
            if not self.speculator.needs_costs:
                return
            with self._gate.shared():
                prompt = self.tokenizer.encode("The quick brown fox jumps over the lazy dog. "
                                               * 8)[:32]
                self.speculator.costs = measure_costs(
                    self.path, f"costs-{uuid.uuid4().hex[:8]}", prompt,
                    self.plan.batch_tokens, SamplingParams())

    def _tokens(self, session: Session, prompt: list[int], limit: int,
                stats: GenerationStats) -> Iterator[int | Failover]:
        """Sampled token ids: the prompt's chunks all in flight at once, then pass by pass
        (a pass adds one token, or with speculation the drafts its verdict kept and one)."""
        if not session.prompt_chunks:  # else made by ``fork``
            session.prompt_chunks = prompting.cut(
                prompt, self._chunk_size(len(prompt), session.score_prompt))
        session.limit = limit
        produced, prompted = 0, False
        while produced < limit or not prompted:  # a limit of 0: the prompt alone (scored)
            prompted = True
            t0 = time.perf_counter()
            (out, step), notice = self._step(session)
            took = time.perf_counter() - t0
            tokens = out.tokens[:limit - produced] if out.token != NO_TOKEN else ()
            if step is None:
                stats.prompt_s = stats.first_token_s = took
            else:
                stats.decode_s += took
                stats.decode_tokens += len(tokens)
                stats.add_decode(out.timings)
                stats.speculation.add(step, took, overlapped=out.ahead)
                stats.speculation.draft_s = session.draft_s
            if notice is not None:
                yield notice
            for token in tokens:
                produced += 1
                yield token

    def _step(self, session: Session
              ) -> tuple[tuple[StageResult, Pass | None], Failover | None]:
        """The session's next step (and its pass, after the prompt), failing over as often
        as ``MAX_FAILOVERS`` allows."""
        notice = None
        for attempt in range(MAX_FAILOVERS + 1):
            with self._gate.shared():
                epoch = self._epoch
                try:
                    return self._advance(session), notice
                except OrchError as exc:
                    if (self.replanner is None or not calls_for_failover(exc)
                            or attempt == MAX_FAILOVERS):
                        raise
                    failure = exc
            notice = self._fail_over(epoch, failure) or notice
        raise AssertionError("unreachable")

    def _advance(self, session: Session) -> tuple[StageResult, Pass | None]:
        """Send what the session has not fed yet (the whole prompt, or its pending token
        and its drafts) and record what the step added. Runs under the step gate, so a
        failover sees either the step recorded or not done. With the token ring on, the
        last stage feeds each step to stage 0 itself: after the first, steps only wait; a
        session this side drafts for (a draft model) sends every step."""
        if session.ring is not None:
            chunk, ring_left = session.ring.chunk, session.ring.left
        else:
            session.draft_k = self.speculator.choose(session)
            ring = self.settings.token_ring and not (session.draft_k
                                                     and self.speculator.drafts_here)
            ring_left = TokenRing.length(ring, session.limit, len(session.generated))
            if (segment := self.speculator.ring_segment()) is not None:
                ring_left = min(ring_left, segment)
            chunk = self._send_step(session, ring_left)
        out = self._wait(session, chunk)
        step = session.record(out)
        session.ring = TokenRing.after(
            out.chunk, ring_left, added=len(out.tokens),
            stopped=any(self.tokenizer.is_end_of_generation(t) for t in out.tokens))
        return out, step

    def _wait(self, session: Session, chunks: int | list[int]) -> StageResult:
        """The result of the last of ``chunks``, after the scored rows of the others."""
        if isinstance(chunks, int):
            return self.path.wait(session.id, chunks)
        scores = []
        for chunk in chunks:
            out = self.path.wait(session.id, chunk)
            scores += out.row_scores
        session.prompt_scores = scores
        return out

    def _send_step(self, session: Session, ring_left: int) -> int | list[int]:
        """Send the session's next step (its prompt in chunks, or its pending token and
        the drafts to verify with it); returns the chunk number whose result comes next
        (a prompt's: the numbers of every chunk that is answered, in order)."""
        stops = self.tokenizer.end_of_generation if ring_left else ()
        draft_k = session.draft_k if ring_left else 0  # the ring's steps draft this many
        ahead = self.settings.speculate_ahead  # and are sent before the verdicts they assume
        if session.generated:
            budget = ring_left or session.limit - len(session.generated) - 1
            drafts = self.speculator.drafts(session, budget, self.plan.context_tokens,
                                            self.plan.batch_tokens) if session.draft_k else ()
            return self.path.send(session.id, session.length,
                                  [session.generated[-1], *drafts], want_token=True,
                                  ring_left=ring_left, ring_stops=stops,
                                  drafted=len(drafts), draft_k=draft_k, draft_ahead=ahead)
        return prompting.send(self.path, session, want_token=session.limit > 0,
                              ring_left=ring_left, stops=stops, draft_k=draft_k,
                              draft_ahead=ahead)

    # --- failover ----------------------------------------------------------------------

    def _fail_over(self, epoch: int, failure: OrchError) -> Failover | None:
        """Replace the pipeline that failed with ``failure`` and replay every live session;
        None if another step did so already."""
        with self._failing_over:
            if self._epoch != epoch:
                return None
            started = time.monotonic()
            old = self.path
            failed = set(old.failed)
            if failure.worker and self.plan.stage_of(failure.worker) is not None:
                failed.add(failure.worker)
            log.warning("failing over: %s", failure)
            old.abandon(failure)
            with self._gate.exclusive():
                undeploy(self.deployment, old.clients, self.settings.cleanup_deadline_s,
                         skip=failed)
                for address in failed:
                    self._excluded[address] = self.deployment
                try:
                    sessions = self._rebuild(self.plan)
                except PlanError as exc:
                    raise PlanError(f"{failure}; no plan without "
                                    f"{', '.join(sorted(self._excluded))}: {exc}") from None
            return Failover(tuple(sorted(failed)), str(failure), self.plan, sessions,
                            time.monotonic() - started)

    def _rebuild(self, base: Plan) -> int:
        """Plan ``base`` again without the excluded workers, deploy it, replay every live
        session; a worker failing meanwhile is excluded too. Returns the sessions replayed.
        Called with the step gate held alone."""
        for attempt in range(MAX_FAILOVERS + 1):
            plan = self.replanner.plan_without(base, set(self._excluded))
            pipeline = self.replanner.open(plan)
            live = [s for s in self._live.values() if s.generated]
            try:
                for session in live:
                    replay(pipeline.path, session)
            except OrchError as exc:
                if not calls_for_failover(exc) or attempt == MAX_FAILOVERS:
                    self._adopt(pipeline)  # its close releases the workers
                    raise
                log.warning("failing over again: %s", exc)
                pipeline.path.abandon(exc)
                failed = set(pipeline.path.failed) | (
                    {exc.worker} if exc.worker and plan.stage_of(exc.worker) else set())
                undeploy(pipeline.deployment, pipeline.path.clients,
                         self.settings.cleanup_deadline_s, skip=failed)
                for address in failed:
                    self._excluded[address] = pipeline.deployment
                continue
            prompting.unshare(list(self._live.values()))
            for session in self._live.values():
                session.ring = None  # the old pipeline's ring is gone: the next step sends
            self._adopt(pipeline)
            return len(live)
        raise AssertionError("unreachable")

    def _adopt(self, pipeline: Pipeline) -> None:
        self.plan, self.deployment, self.path = pipeline.plan, pipeline.deployment, \
            pipeline.path
        self._epoch += 1

    def _rejoin(self) -> None:
        """Between answers: workers left out that answer again rejoin, with a new plan."""
        if not self._returned or self.replanner is None:
            return
        with self._failing_over:
            if self._live:
                return  # never mid-answer
            for address in self._returned & set(self._excluded):
                stale = self._excluded.pop(address)  # it may still hold the old stage
                with contextlib.suppress(OrchError):
                    self.replanner.client(address).unload(
                        stale.pipeline_id, stale.holder, self.settings.cleanup_deadline_s)
            self._returned.clear()
            plan = self.replanner.plan_without(self.first_plan, set(self._excluded))
            if _cut(plan) == _cut(self.plan):
                return
            log.info("workers answer again: planning with them")
            self.path.abandon(OrchError("replaced by a new plan"))
            with self._gate.exclusive():
                undeploy(self.deployment, self.path.clients, self.settings.cleanup_deadline_s,
                         skip=self.path.failed)
                self._adopt(self.replanner.open(plan))

    def record_speeds(self, stats: GenerationStats, book: SpeedBook, facts: ModelFacts,
                      shape_key: str) -> None:
        """Keep what this answer measured of each stage, for the next plan (per device kind,
        with the head's share taken out: ``SpeedBook.refine``)."""
        book.refine(self.plan, facts, shape_key, stats.compute_ms, stats.decode_tokens)

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
                 skip=self.path.failed | set(self._excluded))

    def __enter__(self) -> RunningModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut(plan: Plan) -> tuple[tuple[str, int, int], ...]:
    return tuple((s.worker, s.layers.start, s.layers.end) for s in plan.stages)
