"""Several sessions' decode steps in one ``llama_decode``: split equals unsplit for the
same batches, bit for bit (f32 hidden states)."""

from __future__ import annotations

import numpy as np
import pytest
from chain import Chain
from reference import ReferenceModel

from orchcore.engine import EngineConfig, Step
from orchcore.errors import InvalidInputError

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
