"""The acceptance rules on numpy logits, no workers: greedy keeps the longest matching
prefix plus one; speculative sampling's output follows the target's distribution exactly
(chi-square over an 8-token vocabulary, 40,000 draws, fixed seeds); ``target_probs`` is the
distribution llama.cpp's own sampler chain draws from."""

from __future__ import annotations

import numpy as np
import pytest

from orchcore.errors import InvalidInputError, InvalidSettingError
from orchcore.sampling import SamplingParams
from orchcore.speculation.accept import (
    Verdict,
    greedy_verdict,
    speculative_verdict,
    target_probs,
)

V = 8
DRAWS = 40_000
# chi-square critical value, 7 degrees of freedom, p = 0.001 (the seeds are fixed, so a
# pass is reproducible; a wrong rule misses by orders of magnitude, see the last test)
CHI2_7_999 = 24.32


def chi_square(counts: np.ndarray, p: np.ndarray) -> float:
    expected = counts.sum() * p
    used = expected > 0
    assert counts[~used].sum() == 0, f"draws of impossible tokens: {counts}"
    return float(((counts[used] - expected[used]) ** 2 / expected[used]).sum())


def dof_critical(p: np.ndarray) -> float:
    """The p = 0.001 critical value for the categories ``p`` allows (2..8 of them)."""
    table = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: CHI2_7_999}
    return table[int((p > 0).sum()) - 1]


def distributions(rng: np.random.Generator, rows: int) -> np.ndarray:
    p = rng.dirichlet(np.full(V, 0.7), size=rows)
    return p / p.sum(axis=1, keepdims=True)


def test_greedy_keeps_longest_matching_prefix_plus_one():
    logits = np.zeros((4, V), np.float32)
    logits[[0, 1, 2, 3], [3, 5, 1, 6]] = 1.0
    assert greedy_verdict([3, 5, 1], logits) == Verdict(3, 6), "all kept, then a bonus"
    assert greedy_verdict([3, 5, 2], logits) == Verdict(2, 1), "the target's own correction"
    assert greedy_verdict([4, 5, 1], logits) == Verdict(0, 3)
    assert greedy_verdict([], logits[:1]) == Verdict(0, 3), "no drafts: a plain step"
    assert Verdict(2, 1).tokens([3, 5, 2]) == [3, 5, 1]


def test_greedy_ties_go_to_the_lowest_id():
    logits = np.zeros((2, V), np.float32)
    assert greedy_verdict([0], logits) == Verdict(1, 0)


@pytest.mark.parametrize("bad, match", [
    (([1, 2], np.zeros((2, V))), "need 3 rows for 2 drafts"),
    (([V], np.zeros((2, V))), "outside the vocabulary of 8"),
])
def test_rows_must_match_drafts(bad, match):
    with pytest.raises(InvalidInputError, match=match):
        greedy_verdict(*bad)


def test_one_hot_drafts_keep_the_target_distribution():
    """A deterministic drafter: first token ~ p[0]; given the draft was kept, the second ~
    p[1]; and a pass keeps its first draft with probability p[0][draft]."""
    rng = np.random.default_rng(20261201)
    p = distributions(rng, 3)
    drafts = [int(np.argsort(p[0])[-3]), int(np.argmax(p[1]))]  # a middling first guess
    first = np.zeros(V, np.int64)
    second = np.zeros(V, np.int64)
    kept = 0
    for _ in range(DRAWS):
        v = speculative_verdict(drafts, p, None, rng)
        out = v.tokens(drafts)
        first[out[0]] += 1
        kept += v.accepted >= 1
        if v.accepted >= 1:
            second[out[1]] += 1
    assert chi_square(first, p[0]) < CHI2_7_999, (first, p[0])
    assert chi_square(second, p[1]) < CHI2_7_999, (second, p[1])
    want = p[0][drafts[0]]
    assert abs(kept / DRAWS - want) < 4 * np.sqrt(want * (1 - want) / DRAWS), (kept, want)


def test_sampled_drafts_keep_the_target_distribution():
    """A drafter that samples its tokens from its own q: the output still follows p."""
    rng = np.random.default_rng(7)
    p, q = distributions(rng, 2), distributions(rng, 1)
    counts = np.zeros(V, np.int64)
    for _ in range(DRAWS):
        x = int(rng.choice(V, p=q[0]))
        counts[speculative_verdict([x], p, q, rng).tokens([x])[0]] += 1
    assert chi_square(counts, p[0]) < CHI2_7_999, (counts, p[0])


def test_a_wrong_rule_fails_the_same_check():
    """The check has teeth: keeping every draft (no acceptance test) is caught."""
    rng = np.random.default_rng(7)
    p, q = distributions(rng, 2), distributions(rng, 1)
    counts = np.bincount(rng.choice(V, p=q[0], size=DRAWS), minlength=V)
    assert chi_square(counts, p[0]) > 100 * CHI2_7_999


def test_draft_with_zero_probability_under_its_drafter_is_refused():
    p = np.full((2, V), 1 / V)
    q = np.zeros((1, V))
    q[0, 1] = 1.0
    with pytest.raises(InvalidInputError, match="probability 0"):
        speculative_verdict([0], p, q, np.random.default_rng(0))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0, seed=1),
    SamplingParams(temperature=1.3, top_k=5, top_p=1.0, min_p=0.0, seed=2),
    SamplingParams(temperature=0.7, top_k=0, top_p=0.8, min_p=0.0, seed=3),
    SamplingParams(temperature=1.0, top_k=6, top_p=0.9, min_p=0.1, seed=4),
], ids=["temp", "top_k", "top_p", "all"])
def test_target_probs_is_what_llama_cpp_samples(params):
    """llama.cpp's chain (``worker.sampler``) drawn 40,000 times on 8-token logits."""
    from worker.sampler import TokenSampler

    logits = np.array([2.0, 1.5, 1.4, 0.3, -0.5, 1.0, -2.0, 0.1], np.float32)
    p = target_probs(logits, params)[0]
    with TokenSampler(params, V) as sampler:
        counts = np.bincount([sampler.sample(logits) for _ in range(DRAWS)], minlength=V)
    assert chi_square(counts, p) < dof_critical(p), (counts, np.round(p * DRAWS))


def test_target_probs_refuses_greedy_and_penalties():
    with pytest.raises(InvalidSettingError, match="greedy"):
        target_probs(np.zeros((1, V)), SamplingParams())
    with pytest.raises(InvalidSettingError, match="repeat_penalty to 1"):
        target_probs(np.zeros((1, V)), SamplingParams(temperature=1.0, repeat_penalty=1.1))
