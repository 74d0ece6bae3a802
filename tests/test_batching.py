"""Several sessions' decode steps in one ``llama_decode``: split equals unsplit for the
same batches, bit for bit (f32 hidden states)."""

from __future__ import annotations

import numpy as np
import pytest

from orchcore.engine import EngineConfig, Step
from orchcore.errors import InvalidInputError
from testkit.chain import Chain
from testkit.cluster import GREEDY, open_model, worker_server
from testkit.reference import ReferenceModel
from worker.stage import InFlight

PROMPTS = ["The capital of France is Paris. The capital of Italy is",
           "def add(a, b):\n    return",
           "Once upon a time, in a small village,",
           "1, 2, 3, 4,"]
CONTEXT = 64
THREADS = 1
# Batches of decode steps, by session index: all together, a subset in another order, alone.
COMPOSITIONS = [[0, 1, 2, 3], [2, 0], [3, 1, 0], [1], [0, 1, 2, 3], [3, 2, 1, 0]]


def test_batched_decode_steps_equal_the_unsplit_model_fed_the_same_batches(
        smollm2_path, tmp_path):
    ref = ReferenceModel(smollm2_path, n_ctx=CONTEXT, threads=THREADS, n_seq=len(PROMPTS))
    chain = Chain(smollm2_path, [10, 20], tmp_path,
                  EngineConfig(threads=THREADS, context_tokens=CONTEXT,
                               max_sessions=len(PROMPTS), batch_tokens=32))
    try:
        prompts = [ref.tokenize(p) for p in PROMPTS]
        last = {}
        for i, prompt in enumerate(prompts):  # each prompt alone, on both sides
            expected = ref.eval_batch([(i, prompt)])
            got = chain.forward(f"s{i}", range(len(prompt)), prompt)
            assert np.array_equal(got, expected), f"prompt {i}"
            last[i] = int(expected[-1].argmax())
        for step, members in enumerate(COMPOSITIONS):
            expected = ref.eval_batch([(i, [last[i]]) for i in members])
            got = chain.forward_batch([(f"s{i}", ref.positions[i] - 1, last[i])
                                       for i in members])
            diff = float(np.abs(got - expected).max())
            assert np.array_equal(got, expected), f"batch {step} {members}: max diff {diff}"
            for row, i in enumerate(members):
                last[i] = int(expected[row].argmax())
    finally:
        chain.close()
        ref.close()


def test_a_batch_of_sessions_takes_one_row_each_and_each_session_once(smollm2_path,
                                                                       tmp_path):
    chain = Chain(smollm2_path, [15], tmp_path,
                  EngineConfig(threads=THREADS, context_tokens=CONTEXT, max_sessions=2,
                               batch_tokens=8))
    try:
        stage = chain.stages[0]
        two_rows = Step("a", np.array([0, 1], np.int32))
        with pytest.raises(InvalidInputError, match="one row per session"):
            stage.forward_batch([two_rows, Step("b", np.array([0], np.int32))],
                                tokens=[1, 2, 3])
        with pytest.raises(InvalidInputError, match="each session once"):
            stage.forward_batch([Step("a", np.array([0], np.int32))] * 2, tokens=[1, 2])
        assert stage.sessions == ()
    finally:
        chain.close()


def test_sessions_in_flight_together_share_batches_and_match_the_unsplit_model(
        smollm2_path, tmp_path):
    """Four sessions' decode steps queued together at stage 0 go through both workers as
    batches; the unsplit model fed the batches the workers report picks the same tokens."""
    steps = 12
    with worker_server(tmp_path / "a") as a, worker_server(tmp_path / "b") as b, \
            open_model(smollm2_path, [a, b], None, tmp_path, max_sessions=len(PROMPTS),
                       context_tokens=CONTEXT) as model:
        ref = ReferenceModel(smollm2_path, n_ctx=CONTEXT, threads=THREADS, n_seq=len(PROMPTS))
        path = model.path
        prompts = [ref.tokenize(p) for p in PROMPTS]
        sessions = [f"batched-{i}" for i in range(len(PROMPTS))]
        token, pos = {}, {}
        for i, prompt in enumerate(prompts):  # one by one: slots 0..3 on every stage
            out = path.wait(sessions[i], path.send(sessions[i], 0, prompt, True, GREEDY))
            token[i], pos[i] = out.token, len(prompt)
            assert out.token == int(ref.eval_batch([(i, prompt)])[-1].argmax()), f"prompt {i}"
        sent, picked = {}, {}  # chunk -> (session index, token in); chunk -> token out
        batches = set()
        for _ in range(steps):
            chunks = {}
            for i, session in enumerate(sessions):  # queued back to back: stage 0 batches
                chunks[i] = path.send(session, pos[i], [token[i]], True)
                sent[chunks[i]] = (i, token[i])
            for i, session in enumerate(sessions):
                out = path.wait(session, chunks[i])
                batches.add(tuple(out.batch) or (out.chunk,))
                picked[out.chunk] = token[i] = out.token
                pos[i] += 1
        for session in sessions:
            path.end_session(session)
        assert any(len(batch) > 1 for batch in batches), batches
        expected = {}
        for batch in sorted(batches, key=max):  # a session's steps in order
            logits = ref.eval_batch([(sent[c][0], [sent[c][1]]) for c in batch])
            expected.update({c: int(row.argmax()) for c, row in zip(batch, logits, strict=True)})
        ref.close()
    assert picked == expected


def test_a_batch_is_back_when_any_of_its_sessions_steps_again_or_ends():
    flight = InFlight()
    flight.sent(["a", "b"], now=1.0)
    flight.sent(["c"], now=1.01)
    assert flight.busy(now=1.02) == (2, 3)
    flight.returned("b", now=1.03)  # the last stage answers a batch at once: "a" is back too
    assert flight.busy(now=1.03) == (1, 1) and flight.round_trip_s == pytest.approx(0.03)
    flight.returned("a", now=1.04)
    flight.returned("unknown", now=1.04)
    assert flight.busy(now=1.04) == (1, 1)
    # "c" has gone quiet (an idle chat): after a few round trips it no longer counts
    assert flight.busy(now=1.5) == (0, 0)
    flight.returned("c", now=2.0)  # or "c" ended
    assert flight.busy(now=2.0) == (0, 0) and flight.round_trip_s == pytest.approx(0.99)
