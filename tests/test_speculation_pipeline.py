"""Speculative decoding through real workers: verification chunks go down the stages as
one batch, the last stage judges them, every stage rolls back what it rejected.

Greedy answers equal the unsplit model fed the same batches (the prompt in its chunks,
then every recorded pass with its drafts, rolled back to each pass's start), on the real
135M, the real Gemma 3 270M and a generated model, with the token ring (the last stage
drafts) and without it (this side drafts), which also draft the same passes. Seeded
sampling is reproducible run to run. Sessions that speculate share the pipeline with plain
ones.
"""

from __future__ import annotations

import threading
import time

import pytest

from orchcore.modelgen import preset, write_model
from orchcore.sampling import SamplingParams
from orchcore.speculation.accept import greedy_verdict
from orchestrator.pipeline.session import GenerationStats, RunningModel, Session
from testkit.cluster import GREEDY, open_model, worker_server
from testkit.reference import ReferenceModel

COPY = ("Repeat this paragraph exactly, but write 'evening' instead of 'night': The old "
        "lighthouse keeper climbed the stairs every night to light the lamp. The ships passed "
        "safely through the narrow strait, and the village slept without fear of the rocks.")
ANSWER = 40
SEEDED = SamplingParams(temperature=0.8, seed=4321)


@pytest.fixture(scope="module")
def three_workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    with worker_server(root / "a") as a, worker_server(root / "b") as b, \
            worker_server(root / "c") as c:
        yield [a, b, c]


@pytest.fixture(scope="module")
def workers(three_workers):
    return three_workers[:2]


def answer(model: RunningModel, prompt: list[int], sampling: SamplingParams = GREEDY,
           n: int = ANSWER) -> tuple[list[int], Session, GenerationStats]:
    session, stats = model.new_session(sampling), GenerationStats()
    return list(model.stream(session, prompt, n, stats)), session, stats


def assert_unsplit_agrees(path, session: Session, tokens: list[int]) -> None:
    """The unsplit model fed ``session``'s batches (prompt chunks, then each pass, rolled
    back to its start) keeps the same drafts and picks the same tokens, pass by pass."""
    ref = ReferenceModel(path, threads=1)
    try:
        for chunk in session.prompt_chunks:
            logits = ref.eval_batch([(0, list(chunk))])
        assert int(logits[-1].argmax()) == session.generated[0], "the prompt's token"
        for n, step in enumerate(session.passes):
            ref.rollback(step.start)
            rows = ref.eval(list(step.tokens))
            verdict = greedy_verdict(step.tokens[1:], rows)
            got = (*step.tokens[1:][:verdict.accepted], verdict.token)
            assert got == step.added, (f"pass {n} at {step.start} with {step.drafted} drafts: "
                                       f"unsplit {got}, pipeline {step.added}")
    finally:
        ref.close()
    assert tokens == session.generated[:len(tokens)]


@pytest.mark.parametrize("ring", [True, False])
@pytest.mark.parametrize("n_workers", [2, 3])
def test_greedy_speculation_equals_the_unsplit_model_fed_the_same_batches_real(
        smollm2_path, three_workers, tmp_path, ring, n_workers, capsys):
    """Over 2 and 3 workers: stage 0 of the tied 135M takes the rows of the drafts with
    them, from the last stage (the ring drafts) or the orchestrator (it drafts)."""
    workers = three_workers[:n_workers]
    with open_model(smollm2_path, workers, None, tmp_path, token_ring=ring,
                    speculate="ngram:4") as model:
        prompt = model.encode([{"role": "user", "content": COPY}])
        tokens, session, stats = answer(model, prompt)
    with open_model(smollm2_path, workers, None, tmp_path, token_ring=ring) as model:
        plain, _, _ = answer(model, prompt)
    drafted = [p.drafted for p in session.passes]
    kept = [len(p.added) - 1 for p in session.passes]
    assert sum(kept) > 0 and any(k < d for k, d in zip(kept, drafted, strict=True)), \
        f"passes should keep some drafts and reject some: drafted {drafted}, kept {kept}"
    assert stats.decode_tokens == len(tokens) - 1 and stats.speculation.passes < len(tokens) - 1
    assert_unsplit_agrees(smollm2_path, session, tokens)
    same = sum(a == b for a, b in zip(tokens, plain, strict=False))
    with capsys.disabled():
        print(f"\n135M over {n_workers}, ring {ring}: {len(tokens)} tokens in "
              f"{stats.speculation.passes + 1} passes ({sum(kept)}/{sum(drafted)} drafts "
              f"kept); equal to plain one-token decoding at {same}/{len(tokens)} tokens")


def plain_tokens(path, session: Session, n: int) -> list[int]:
    """The unsplit model's plain greedy answer: ``session``'s prompt chunks, then one token
    per step."""
    ref = ReferenceModel(path, threads=1)
    try:
        for chunk in session.prompt_chunks:
            logits = ref.eval_batch([(0, list(chunk))])
        tokens = [int(logits[-1].argmax())]
        while len(tokens) < n:
            tokens.append(int(ref.eval([tokens[-1]])[-1].argmax()))
    finally:
        ref.close()
    return tokens


def test_greedy_speculation_equals_the_unsplit_model_fed_the_same_batches_gemma3(
        gemma3_path, workers, tmp_path, capsys):
    """The real Gemma 3 270M (Gemma Terms of Use; tied, scaled embeddings, sliding-window
    layers) over 2 workers, the ring drafting. Q4_K_M's batch kernels round unlike its
    single-row ones, so plain one-token decoding may part from it; how often is printed."""
    with open_model(gemma3_path, workers, None, tmp_path, speculate="ngram:4") as model:
        prompt = model.encode([{"role": "user", "content": COPY}])
        tokens, session, stats = answer(model, prompt)
    kept = sum(len(p.added) - 1 for p in session.passes)
    assert kept > 0 and any(len(p.added) - 1 < p.drafted for p in session.passes), \
        "passes should keep some drafts and reject some"
    assert_unsplit_agrees(gemma3_path, session, tokens)
    plain = plain_tokens(gemma3_path, session, len(tokens))
    same = next((i for i, (a, b) in enumerate(zip(tokens, plain, strict=True)) if a != b),
                len(tokens))
    with capsys.disabled():
        print(f"\nGemma 3 270M over 2: {len(tokens)} tokens in {stats.speculation.passes + 1} "
              f"passes ({kept}/{stats.speculation.drafted} drafts kept); equal to plain "
              f"one-token decoding for the first {same}/{len(tokens)} tokens")


def test_greedy_speculation_equals_the_unsplit_model_fed_the_same_batches_generated(
        workers, tmp_path, capsys):
    model_path = write_model(tmp_path / "model.gguf", preset("tiny-llama-gqa", n_layers=4))
    prompt = [1, 17, 300, 42, 99, 17, 300, 42, 5, 17, 300]
    with open_model(model_path, workers, None, tmp_path, speculate="ngram:3") as model:
        tokens, session, stats = answer(model, prompt, n=48)
    drafted = [p.drafted for p in session.passes]
    assert sum(drafted) > 0, "prompt lookup drafted nothing on this answer"
    assert_unsplit_agrees(model_path, session, tokens)
    with capsys.disabled():
        print(f"\ngenerated: {len(tokens)} tokens, {stats.speculation.accepted}/"
              f"{stats.speculation.drafted} drafts kept in {stats.speculation.passes} passes")


def test_seeded_sampling_is_reproducible_and_the_ring_drafts_what_this_side_would(
        smollm2_path, workers, tmp_path):
    runs = []
    for ring in (True, True, False):
        with open_model(smollm2_path, workers, None, tmp_path, token_ring=ring,
                        speculate="ngram:4") as model:
            prompt = model.encode([{"role": "user", "content": COPY}])
            tokens, session, _ = answer(model, prompt, SEEDED)
            runs.append((tokens, [(p.start, p.tokens, p.added) for p in session.passes]))
    assert sum(len(t) - 1 for _, passes in runs for _, t, _ in passes) > 0, "no drafts"
    assert runs[0] == runs[1], "the same seed gave another answer"
    assert runs[0] == runs[2], "the ring's passes differ from the orchestrator's"


def test_speculating_and_plain_sessions_share_the_pipeline(smollm2_path, workers, tmp_path):
    """Two speculative and two plain sessions at once: stage 0 batches the plain steps and
    computes verification chunks alone; every answer equals the same answer alone, and
    every KV slot is free afterwards."""
    with open_model(smollm2_path, workers, None, tmp_path, max_sessions=4,
                    speculate="ngram:4") as model:
        prompt = model.encode([{"role": "user", "content": COPY}])
        alone, _, _ = answer(model, prompt)
        plain_alone, _, _ = answer(model, prompt, SamplingParams(temperature=0.0,
                                                                 repeat_penalty=1.1))
        results: dict[int, list[int]] = {}

        def run(i: int) -> None:
            sampling = GREEDY if i % 2 == 0 else SamplingParams(temperature=0.0,
                                                                repeat_penalty=1.1)
            results[i] = answer(model, prompt, sampling)[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert sorted(results) == [0, 1, 2, 3], "a session did not finish"
        assert results[0] == results[2] == alone
        assert results[1] == results[3] == plain_alone
        give_up = time.monotonic() + 10  # the last session's end reaches the last stage
        while (held := [c.info().loaded.sessions for c in model.path.clients]) != [0, 0]:
            assert time.monotonic() < give_up, f"sessions still held: {held}"
            time.sleep(0.05)


@pytest.mark.parametrize(("sampling", "n_workers"), [(GREEDY, 2), (SEEDED, 2), (GREEDY, 3)],
                         ids=["greedy", "seeded", "greedy-3-stages"])
def test_passes_sent_ahead_are_the_passes_of_one_at_a_time(smollm2_path, three_workers,
                                                             tmp_path, sampling, n_workers,
                                                             capsys):
    """Asynchronous speculation: the last stage sends each pass before its verdict on the
    one before, betting every draft is kept (over 3 stages, a chain of 2 bets). Won bets
    overlap passes, lost ones are dropped and the real pass follows: the answer and every
    pass equal the one-at-a-time run's."""
    runs = {}
    workers = three_workers[:n_workers]
    for ahead in (True, False):
        with open_model(smollm2_path, workers, None, tmp_path, speculate="ngram:4",
                        speculate_ahead=ahead) as model:
            prompt = model.encode([{"role": "user", "content": COPY}])
            tokens, session, stats = answer(model, prompt, sampling)
            runs[ahead] = (tokens, [(p.start, p.tokens, p.added) for p in session.passes],
                           stats.speculation, session)
    (tokens, passes, spec, session), (plain_tokens, plain_passes, plain_spec, _) = \
        runs[True], runs[False]
    assert tokens == plain_tokens and passes == plain_passes
    assert plain_spec.overlapped == 0
    assert 0 < spec.overlapped < spec.passes, \
        f"some bets should win and some lose: {spec.overlapped} of {spec.passes} overlapped"
    if sampling is GREEDY:
        assert_unsplit_agrees(smollm2_path, session, tokens)
    with capsys.disabled():
        print(f"\n135M ahead over {n_workers} ({'greedy' if sampling is GREEDY else 'seeded'}):"
              f" {spec.overlapped} of {spec.passes} passes overlapped")


def test_serve_shows_what_speculation_kept(smollm2_path, workers, tmp_path):
    """`orch serve --speculate`: /api/cluster (the page) gives the last answer's drafts
    kept, tokens per pass, passes overlapped and speedup; /metrics counts them."""
    import json
    import urllib.request

    from orchestrator.serve.app import create_app
    from orchestrator.settings import OrchSettings
    from testkit.serving import running
    from testkit.waiting import wait_until

    def get(base: str, path: str, body: dict | None = None) -> str:
        request = urllib.request.Request(base + path, None if body is None else
                                         json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.build_opener().open(request, timeout=120) as reply:
            return reply.read().decode()

    with open_model(smollm2_path, workers, None, tmp_path, speculate="ngram:4",
                    context_tokens=1024) as model, \
            running(create_app(model, "smollm2", OrchSettings.load(max_tokens=48))) as base:
        idle = json.loads(get(base, "/api/cluster"))
        assert idle["speculation"] is None, "no answer yet"
        get(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": COPY}],
                                           "temperature": 0, "max_tokens": 48})
        spec = wait_until(lambda: json.loads(get(base, "/api/cluster"))["speculation"], 10,
                          "the answer's speculation on /api/cluster")  # once it has ended
        assert spec["mode"] == "ngram:4" and 0 < spec["accepted"] <= spec["drafted"]
        assert spec["tokens_per_pass"] > 1 and spec["overlapped"] <= spec["passes"]
        assert spec["speedup"] is not None and spec["speedup"] > 0
        metrics = get(base, "/metrics")
    counted = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
               if line.startswith("orch_speculation")}
    assert counted["orch_speculation_drafted_tokens_total"] == spec["drafted"]
    assert counted["orch_speculation_accepted_tokens_total"] == spec["accepted"]
    assert counted['orch_speculation_passes_total{overlapped="yes"}'] == spec["overlapped"]


def test_auto_measures_then_speculates_only_as_far_as_its_replay_says(smollm2_path, workers,
                                                                      tmp_path, capsys):
    """`auto` measures batch costs through the pipeline before its first answer, replays
    what prompt lookup would have met for each K, and whatever it picks stays exact: the
    same tokens as plain decoding's verified batches on the unsplit model."""
    with open_model(smollm2_path, workers, None, tmp_path, speculate="auto") as model:
        prompt = model.encode([{"role": "user", "content": COPY}])
        tokens, session, stats = answer(model, prompt, n=64)
        costs = model.speculator.costs
        assert costs is not None and costs.step_ms > 0 and 2 in costs.batch_cost
        assert len(session.lookaheads) >= 32, "the answer's positions were measured"
        assert len(model.speculator.recent) > 0, "and kept for the next answers"
    assert_unsplit_agrees(smollm2_path, session, tokens)
    with capsys.disabled():
        print(f"\nauto on the 135M: c(2) {costs.batch_cost[2]:.2f}, "
              f"{stats.speculation.drafted} drafted in {stats.speculation.passes} passes")
