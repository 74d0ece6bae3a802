"""Prompt logprobs, n answers to one prompt and embeddings, through two real workers: the
split model's values equal the unsplit model's, and the copies end on every stage."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from orchcore.sampling import SamplingParams
from orchestrator.cluster.client import WorkerClient
from orchestrator.pipeline.session import Finished, GenerationStats, RunningModel
from orchestrator.settings import OrchSettings
from testkit.cluster import open_model, worker_server
from testkit.reference import ReferenceModel, whole_llama
from testkit.waiting import wait_until

TEXT = "The capital of France is Paris, and the capital of Italy is"


@pytest.fixture(scope="module")
def split(smollm2_path, tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("outputs")
    with worker_server(root / "w0") as a, worker_server(root / "w1") as b, \
            open_model(smollm2_path, [a, b], None, root, max_sessions=4, logprob_rows=5,
                       context_tokens=256) as model:
        workers = [WorkerClient(w, None, OrchSettings()) for w in (a, b)]
        try:
            yield {"model": model, "workers": workers}
        finally:
            for w in workers:
                w.close()


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    peak = rows.max(-1, keepdims=True)
    return rows - (peak + np.log(np.exp(rows - peak).sum(-1, keepdims=True)))


def _answer(model: RunningModel, tokens: list[int], max_tokens: int, **session) -> Finished:
    events = list(model.generate(tokens, max_tokens=max_tokens, **session))
    return events[-1]


def _sessions(split: dict) -> list[int]:
    return [w.info().loaded.sessions for w in split["workers"]]


def test_prompt_logprobs_equal_the_unsplit_model(split, smollm2_path) -> None:
    model: RunningModel = split["model"]
    tokens = model.encode(TEXT, chat=False)
    assert len(tokens) > 10, "the prompt spans several chunks of logprob_rows=5"
    [session] = model.fork(tokens, [SamplingParams(temperature=0.0, logprobs=True,
                                                   top_logprobs=3)], score_prompt=True)
    done = _answer(model, tokens, 0, session=session)
    assert not done.session.generated, "max_tokens 0 generates nothing"
    scores = done.session.prompt_scores
    assert len(scores) == len(tokens), scores
    reference = ReferenceModel(smollm2_path, n_ctx=256)
    try:
        want = _log_softmax(reference.eval(tokens))
    finally:
        reference.close()
    for i, score in enumerate(scores[:-1]):
        assert abs(score.logprob - want[i][tokens[i + 1]]) < 1e-5, (i, score, tokens[i + 1])
        best = np.argsort(-want[i], kind="stable")[:3]
        assert [t for t, _ in score.top] == best.tolist(), (i, score.top)
        assert np.allclose([p for _, p in score.top], want[i][best], atol=1e-5), i
    assert scores[-1].logprob is None, "nothing follows the last prompt token"


def test_n_greedy_answers_are_one_answer_n_times(split) -> None:
    model: RunningModel = split["model"]
    tokens = model.encode(TEXT, chat=False)
    one = _answer(model, tokens, 6).session.generated
    sessions = model.fork(tokens, [SamplingParams(temperature=0.0)] * 3)
    answers = _parallel(model, tokens, sessions, 6)
    assert answers == [one] * 3, (answers, one)
    wait_until(lambda: _sessions(split) == [0, 0], 10, "every copy to end on every stage")


def test_seeded_answers_equal_separate_requests_with_those_seeds(split) -> None:
    model: RunningModel = split["model"]
    tokens = model.encode(TEXT, chat=False)
    samplings = [SamplingParams(temperature=1.0, seed=7 + i) for i in range(3)]
    together = _parallel(model, tokens, model.fork(tokens, samplings), 8)
    apart = [_answer(model, tokens, 8, sampling=s).session.generated for s in samplings]
    assert together == apart, (together, apart)
    assert len({tuple(a) for a in apart}) > 1, f"three seeds gave one answer: {apart}"
    wait_until(lambda: _sessions(split) == [0, 0], 10, "every copy to end on every stage")


def _parallel(model: RunningModel, tokens: list[int], sessions, max_tokens: int
              ) -> list[list[int]]:
    """Each forked session's answer, generated in a thread of its own (as the server does)."""
    import threading

    out: dict[int, list[int]] = {}

    def run(i: int) -> None:
        out[i] = _answer(model, tokens, max_tokens, session=sessions[i]).session.generated

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return [out.get(i) for i in range(len(sessions))]


def test_embeddings_equal_llama_cpp_embeddings(split, smollm2_path) -> None:
    model: RunningModel = split["model"]
    got = model.embed(model.encode(TEXT, chat=False))
    llama = whole_llama(smollm2_path, embedding=True, n_ctx=256)
    try:
        rows = np.asarray(llama.embed(TEXT, normalize=False))
    finally:
        llama.close()
    assert rows.shape[0] > 5, "the input spans several chunks of logprob_rows=5"
    want = rows.astype(np.float64).mean(axis=0)  # SmolLM2 names no pooling: mean
    assert np.abs(got - want).max() < 1e-5, np.abs(got - want).max()


def test_verification_chunks_are_not_bound_by_the_scored_rows(smollm2_path, tmp_path) -> None:
    """ORCH_LOGPROB_ROWS bounds chunks that score or embed their rows, not the drafts a
    verification chunk carries (up to 17 rows)."""
    with worker_server(tmp_path / "w0") as a, worker_server(tmp_path / "w1") as b, \
            open_model(smollm2_path, [a, b], None, tmp_path, logprob_rows=2,
                       speculate="ngram:4", token_ring=False) as model:
        stats = GenerationStats()
        tokens = model.encode("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", chat=False)
        list(model.generate(tokens, SamplingParams(temperature=0.0), max_tokens=24,
                            stats=stats))
        assert stats.speculation.drafted > 2, stats.speculation  # chunks of 3+ rows ran
