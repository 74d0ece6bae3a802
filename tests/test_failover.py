"""A worker dies mid-answer and the answer survives: real worker processes on loopback, a
stage killed (SIGKILL) or hung (SIGSTOP) after a few tokens; the model is planned again
with the standby, the session replayed in its original batch shapes, and the answer goes on
with exactly the tokens of the uninterrupted answer. Without a worker that can take over,
a clear error names the shortfall."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
from rich.console import Console

from orchcore.errors import PlanError
from orchcore.facts import read_model_facts
from orchcore.sampling import SamplingParams
from orchestrator.cli.drafts import open_draft
from orchestrator.cluster.local import LocalCluster
from orchestrator.pipeline.connected import Cluster
from orchestrator.pipeline.session import Failover, RunningModel
from orchestrator.planning.plan import make_plan
from orchestrator.settings import OrchSettings
from orchestrator.text.tokenizer import Tokenizer
from testkit.models import requantized_model
from testkit.waiting import wait_until

PROMPT = "The capital of France is Paris. The capital of Germany is"
ANSWER = 20  # tokens
KILL_AFTER = 4  # tokens into the answer
GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=0.9, seed=1234)


@pytest.fixture(scope="module")
def prompt(smollm2_path) -> list[int]:
    with Tokenizer.from_gguf(smollm2_path) as tokenizer:
        tokens = tokenizer.encode(PROMPT)
    assert len(tokens) > 8  # several chunks of batch_tokens=8: replayed in those shapes
    return tokens


@contextmanager
def failover_model(smollm2_path, cluster: LocalCluster, stages: int, **settings: object
                   ) -> Iterator[RunningModel]:
    """The model on the first ``stages`` of the cluster's workers (one stage each); every
    other worker stays connected as a standby."""
    settings = OrchSettings.load(context_tokens=512, batch_tokens=8, lease_renew_s=1,
                                 **settings)
    facts = read_model_facts(smollm2_path)
    connected = Cluster.connect(cluster.addresses, cluster.token, settings,
                                cluster.check_alive)
    options = settings.plan_options(use_all=True)
    plan = make_plan(facts, connected.devices[:stages], options)
    try:
        with ExitStack() as stack:
            draft = open_draft(stack, settings, smollm2_path, Console(stderr=True))
            tokenizer = stack.enter_context(Tokenizer.from_gguf(smollm2_path))
            with connected.open(plan, facts, tokenizer, options=options, failover=True,
                                draft=draft) as model:
                yield model
    finally:
        connected.close()


def answer(model: RunningModel, prompt: list[int], sampling: SamplingParams,
           signal_at: tuple[int, int] | None = None) -> tuple[list[int], list[Failover], float]:
    """The answer's tokens and failovers; with ``signal_at`` (pid, signal) that signal goes
    to the pid after ``KILL_AFTER`` tokens, and the time from it to the next token."""
    (tokens,), notices, gap = answers(model, prompt, [sampling], signal_at)
    return tokens, notices, gap


def answers(model: RunningModel, prompt: list[int], samplings: list[SamplingParams],
            signal_at: tuple[int, int] | None = None
            ) -> tuple[list[list[int]], list[Failover], float]:
    """Answers in flight together (advanced in turn), as ``answer``."""
    streams = [model.steps(model.new_session(s), prompt, ANSWER) for s in samplings]
    tokens: list[list[int]] = [[] for _ in samplings]
    notices, gap, sent = [], 0.0, None
    for _ in range(ANSWER):
        for stream, got in zip(streams, tokens, strict=True):
            while isinstance(item := next(stream), Failover):
                notices.append(item)
            got.append(item)
            if sent is not None and not gap:
                gap = time.monotonic() - sent
            if signal_at is not None and sent is None and len(got) == KILL_AFTER:
                os.kill(*signal_at)
                sent = time.monotonic()
    for stream in streams:
        assert next(stream, None) is None
    return tokens, notices, gap


def pid_of(cluster: LocalCluster, address: str) -> int:
    return cluster.procs[cluster.addresses.index(address)].pid


@pytest.mark.parametrize("victim", [0, 1, 2])
def test_killed_stage_is_replaced_and_the_answers_are_unchanged(
        smollm2_path, prompt, tmp_path, victim):
    """A greedy and a seeded answer in flight: both replayed, both unchanged."""
    with LocalCluster(4, tmp_path / "w", threads_per_worker=1) as cluster, \
            failover_model(smollm2_path, cluster, 3) as model:
        want, _, _ = answers(model, prompt, [GREEDY, SEEDED])
        address = model.plan.stages[victim].worker
        got, notices, gap = answers(model, prompt, [GREEDY, SEEDED],
                                    (pid_of(cluster, address), signal.SIGKILL))
        print(f"SIGKILL stage {victim}: {gap:.2f} s from the kill to the next token; "
              f"{notices[0].describe() if notices else 'no failover'}")
        assert got == want
        assert len(notices) == 1 and notices[0].failed == (address,)
        assert notices[0].sessions == 2 and address in notices[0].reason
        workers = [s.worker for s in model.plan.stages]
        assert address not in workers and cluster.addresses[3] in workers  # the standby
        assert gap < 10


@pytest.mark.parametrize("drafter", ["ngram:3", "draft"])
def test_a_speculative_session_is_replayed_pass_by_pass_and_goes_on_unchanged(
        smollm2_path, prompt, tmp_path, drafter):
    """Prompt lookup drafts on this answer (it repeats the prompt's pattern), or a draft
    model here (the 135M requantized to Q4_0); the session's passes, rejected drafts
    included, are sent again on the new pipeline: a greedy and a seeded answer go on
    exactly as without the kill."""
    if drafter == "draft":
        drafter = f"draft:{requantized_model(smollm2_path)}"
    with LocalCluster(3, tmp_path / "w", threads_per_worker=1) as cluster, \
            failover_model(smollm2_path, cluster, 2, speculate=drafter) as model:
        sessions = []
        original = model.new_session
        model.new_session = lambda s: sessions.append(original(s)) or sessions[-1]
        want, _, _ = answers(model, prompt, [GREEDY, SEEDED])
        drafted = [p.drafted for s in sessions for p in s.passes]
        assert sum(drafted) > 0, f"nothing drafted: {drafted}"
        address = model.plan.stages[1].worker
        got, notices, _ = answers(model, prompt, [GREEDY, SEEDED],
                                  (pid_of(cluster, address), signal.SIGKILL))
        replayed = [p.drafted for s in sessions[2:] for p in s.passes]
        print(f"speculative failover: drafts per pass {replayed}; "
              f"{notices[0].describe() if notices else 'no failover'}")
        assert got == want
        assert len(notices) == 1 and notices[0].failed == (address,)
        assert notices[0].sessions == 2


def test_hung_stage_is_replaced_and_rejoins_on_the_next_answer(
        smollm2_path, prompt, tmp_path):
    with LocalCluster(4, tmp_path / "w", threads_per_worker=1) as cluster:
        victim = None
        try:
            with failover_model(smollm2_path, cluster, 3) as model:
                first = [s.worker for s in model.plan.stages]
                address = first[1]
                victim = cluster.procs[cluster.addresses.index(address)]
                want, _, _ = answer(model, prompt, GREEDY)
                got, notices, gap = answer(model, prompt, GREEDY, (victim.pid, signal.SIGSTOP))
                print(f"SIGSTOP stage 1: {gap:.2f} s from the stop to the next token")
                assert got == want
                assert [n.failed for n in notices] == [(address,)]
                assert "did not answer in time" in notices[0].reason
                assert gap < 10
                os.kill(victim.pid, signal.SIGCONT)  # it comes back: not mid-answer, but ...
                wait_until(lambda: address in model._returned, 10,
                           "the worker back to be noticed")
                assert answer(model, prompt, GREEDY)[0] == want
                assert [s.worker for s in model.plan.stages] == first  # ... on the next one
        finally:
            if victim is not None and victim.poll() is None:
                os.kill(victim.pid, signal.SIGCONT)


def test_no_worker_to_take_over_is_a_clear_error(smollm2_path, prompt, tmp_path):
    """Two workers, no standby, and the survivor's budget (280 MiB) holds half the model
    but not all of it (about 300 MiB)."""
    with LocalCluster(2, tmp_path / "w", threads_per_worker=1,
                      memory_budgets_mb=[1024, 280]) as cluster, \
            failover_model(smollm2_path, cluster, 2) as model:
        assert len(model.plan.stages) == 2
        stream = model.steps(model.new_session(GREEDY), prompt, ANSWER)
        for _ in range(KILL_AFTER):
            next(stream)
        os.kill(cluster.procs[0].pid, signal.SIGKILL)  # the survivor has 280 MiB
        started = time.monotonic()
        with pytest.raises(PlanError) as info:
            list(stream)
        took = time.monotonic() - started
        print(f"no fit: {took:.2f} s to the error: {info.value}")
        assert took < 10
        message = str(info.value)
        assert cluster.addresses[0] in message and cluster.addresses[1] in message
        assert "MiB" in message and "280" in message
