"""Verification batches and rollback in the stage engine: a chain fed k drafted tokens in
one pass, then rolled back past the rejected ones, equals the unsplit model fed the same
batches and the same rollbacks, bit for bit; on the real 135M and a generated model.

The drafts come from a script: the unsplit model's own greedy continuation with one token
in each draft changed at a varying place, so passes accept everything, nothing, and every
prefix in between.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from orchcore.engine import EngineConfig, StageEngine
from orchcore.errors import InvalidInputError
from orchcore.modelgen import preset, write_model
from testkit.chain import Chain
from testkit.reference import ReferenceModel

K = 4
NEW_TOKENS = 24
CONTEXT = 128
THREADS = 1  # several engines in one process on a shared 2-core machine


@dataclass
class Trace:
    """What one verification run saw: every pass's logits, and the tokens it kept."""

    logits: list[np.ndarray] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)


Forward = Callable[[int, list[int]], np.ndarray]  # (start position, tokens) -> every row
Rollback = Callable[[int], None]  # keep this many positions


def drafts_for(truth: list[int], done: int, pass_no: int, vocab: int) -> list[int]:
    """The next K tokens of the true continuation, one changed at place ``pass_no % (K+1)``
    (K+1: none changed)."""
    drafts = list(truth[done + 1:done + 1 + K])
    wrong = pass_no % (K + 1)
    if wrong < len(drafts):
        drafts[wrong] = (drafts[wrong] + 1) % vocab
    return drafts


def verify_run(forward: Forward, rollback: Rollback, prompt: list[int], truth: list[int],
               vocab: int) -> Trace:
    """Greedy speculative decoding with scripted drafts; rolls back every rejection."""
    trace = Trace()
    first = forward(0, prompt)
    trace.logits.append(first)
    pending = int(first[-1].argmax())
    pos = len(prompt)
    while len(trace.tokens) < NEW_TOKENS:
        drafts = drafts_for(truth, len(trace.tokens), len(trace.accepted), vocab)
        rows = forward(pos, [pending, *drafts])
        trace.logits.append(rows)
        best = rows.argmax(axis=1)
        m = 0
        while m < len(drafts) and drafts[m] == best[m]:
            m += 1
        trace.tokens += [pending, *drafts[:m]]
        trace.accepted.append(m)
        pos += 1 + m
        rollback(pos)
        pending = int(best[m])
    return trace


def chain_run(chain: Chain, prompt: list[int], truth: list[int], vocab: int) -> Trace:
    def forward(start: int, tokens: list[int]) -> np.ndarray:
        return chain.forward("s", range(start, start + len(tokens)), tokens, all_logits=True)

    try:
        return verify_run(forward, lambda n: chain.rollback("s", n), prompt, truth, vocab)
    finally:
        chain.end_session("s")


def reference_run(ref: ReferenceModel, prompt: list[int], truth: list[int]) -> Trace:
    def forward(start: int, tokens: list[int]) -> np.ndarray:
        assert ref.positions[0] == start, (ref.positions[0], start)
        return ref.eval(tokens)

    return verify_run(forward, ref.rollback, prompt, truth, ref.n_vocab)


def assert_same(want: Trace, got: Trace, label: str) -> None:
    assert got.accepted == want.accepted, (label, want.accepted, got.accepted)
    for i, (a, b) in enumerate(zip(want.logits, got.logits, strict=True)):
        assert np.array_equal(a, b), (label, f"pass {i}", float(np.abs(a - b).max()))


def check_model(model, prompt: list[int], cuts_list, tmp_path, capsys) -> None:
    ref = ReferenceModel(model, n_ctx=CONTEXT, threads=THREADS)
    try:
        truth, _ = ref.greedy(prompt, NEW_TOKENS + K + 1)
        ref.rollback(0)
        want = reference_run(ref, prompt, truth)
    finally:
        ref.close()
    accepted = want.accepted
    assert 0 in accepted and K in accepted and len(set(accepted)) > 2, accepted
    config = EngineConfig(threads=THREADS, context_tokens=CONTEXT, max_sessions=1,
                          batch_tokens=max(len(prompt), K + 1))
    for cuts in cuts_list:
        workdir = tmp_path / "-".join(map(str, cuts))
        workdir.mkdir()
        chain = Chain(model, cuts, workdir, config)
        try:
            assert_same(want, chain_run(chain, prompt, truth, ref.n_vocab), f"cuts {cuts}")
        finally:
            chain.close()
    same = sum(a == b for a, b in zip(want.tokens, truth, strict=False))
    with capsys.disabled():
        print(f"\n{model.name}: verified greedy output equals plain one-token decoding at "
              f"{same}/{len(want.tokens)} tokens (passes accepting {accepted})")


def test_verification_batches_exact_real(smollm2_path, tmp_path, capsys):
    ref = ReferenceModel(smollm2_path, threads=THREADS)
    prompt = ref.tokenize("Copy this sentence: the quick brown fox jumps over the lazy dog.")
    ref.close()
    check_model(smollm2_path, prompt, [[15], [10, 20]], tmp_path, capsys)


def test_verification_batches_exact_generated(tmp_path, capsys):
    model = write_model(tmp_path / "model.gguf", preset("tiny-llama-gqa", n_layers=4))
    check_model(model, [1, 17, 300, 42, 99, 5, 260, 77], [[2], [1, 3]], tmp_path, capsys)


def test_rollback_bounds_and_continue(tmp_path):
    model = write_model(tmp_path / "model.gguf", preset("tiny-llama-gqa", n_layers=2))
    config = EngineConfig(threads=THREADS, context_tokens=32, max_sessions=1, batch_tokens=8)
    with StageEngine(model, config) as engine:
        engine.rollback("new", 0)  # nothing to drop: fine
        first = engine.forward("s", range(6), tokens=[1, 2, 3, 4, 5, 6], all_logits=True)
        assert first.shape[0] == 6, "every row's logits"
        for bad in (7, -1, True, 2.0):
            with pytest.raises(InvalidInputError, match=r"roll back to a length in \[0, 6\]"):
                engine.rollback("s", bad)
        engine.rollback("s", 3)
        assert engine.session_length("s") == 3
        with pytest.raises(InvalidInputError, match="continue at 3"):
            engine.forward("s", [6], tokens=[7])
        again = engine.forward("s", range(3, 6), tokens=[4, 5, 6], all_logits=True)
        assert np.array_equal(again, first[3:]), "recomputed rows equal the first pass's"
