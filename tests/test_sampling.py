"""orchcore.sampling and worker.sampler: parameter validation, and llama.cpp's sampler
chain driven from logits.

Everything but the last test runs on synthetic logits (no model); the last one checks that
``TokenSampler.sample`` + ``accept`` on the engine's logits picks exactly the tokens that
llama.cpp's own ``llama_sampler_sample`` picks on the reference context.
"""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from orchcore.errors import InvalidInputError
from orchcore.sampling import RANDOM_SEED, SamplingParams
from worker.sampler import TokenSampler

GREEDY = SamplingParams(temperature=0.0)
# No truncation: the chain is temperature + dist only.
PURE = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)


def draws(params: SamplingParams, logits: np.ndarray, n: int) -> list[int]:
    with TokenSampler(params, logits.shape[-1]) as sampler:
        return [sampler.sample(logits) for _ in range(n)]


# --- parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("temperature", -0.1, ">= 0"),
    ("temperature", float("nan"), ">= 0"),
    ("temperature", float("inf"), "finite"),
    ("temperature", "0.5", ">= 0"),
    ("top_k", -1, "[0, 2147483647]"),
    ("top_k", 2**31, "[0, 2147483647]"),
    ("top_k", 4.0, "integer"),
    ("top_k", True, "integer"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.01, "(0, 1]"),
    ("min_p", -0.01, "[0, 1]"),
    ("min_p", 1.5, "[0, 1]"),
    ("repeat_penalty", 0.0, "> 0"),
    ("repeat_penalty", -1.0, "> 0"),
    ("repeat_last_n", -1, "[0, 1048576]"),
    ("repeat_last_n", 1 << 21, "[0, 1048576]"),
    ("seed", -1, "[0, 0xffffffff]"),
    ("seed", 2**32, "[0, 0xffffffff]"),
])
def test_params_reject_out_of_range(field: str, value: object, allowed: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    assert allowed in str(info.value)
    assert repr(value) in str(info.value)


def test_params_defaults_and_edges_are_valid() -> None:
    assert SamplingParams().seed == RANDOM_SEED == 0xFFFFFFFF
    SamplingParams(temperature=0, top_k=0, top_p=1, min_p=1, repeat_penalty=0.5,
                   repeat_last_n=0, seed=0)
    numpy_scalars = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(5))
    assert type(numpy_scalars.temperature) is float and type(numpy_scalars.top_k) is int
    assert numpy_scalars == SamplingParams(temperature=0.5, top_k=5)
    assert GREEDY.greedy and SamplingParams().greedy  # greedy by default, as `orch run`
    assert not SamplingParams(temperature=0.8).greedy
    assert not SamplingParams(repeat_penalty=1.1, repeat_last_n=0).penalised
    assert SamplingParams(repeat_penalty=1.1).penalised


def test_sampler_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="n_vocab"):
        TokenSampler(GREEDY, 0)
    with TokenSampler(GREEDY, 10) as sampler:
        with pytest.raises(InvalidInputError, match=r"\(10,\)"):
            sampler.sample(np.zeros(9, np.float32))
        with pytest.raises(InvalidInputError):
            sampler.sample(np.zeros((2, 10), np.float32))
        with pytest.raises(InvalidInputError, match="10"):
            sampler.accept([3, 10])
        with pytest.raises(InvalidInputError):
            sampler.accept([-1])
        sampler.accept([])
        assert sampler.sample(np.eye(10, dtype=np.float32)[4][None, :]) == 4  # [1, n_vocab]


def test_close_twice_is_safe_and_use_after_close_fails() -> None:
    sampler = TokenSampler(SamplingParams(repeat_penalty=1.1), 100)
    sampler.close()
    sampler.close()
    with pytest.raises(ValueError, match="closed"):
        sampler.sample(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="closed"):
        sampler.accept([1])
    with TokenSampler(GREEDY, 5) as inner:
        pass
    inner.close()


# --- greedy -----------------------------------------------------------------------------

# Small integers make ties common; infinities are legal logits (masked tokens), NaN is not.
tied_logits = hnp.arrays(np.float32, st.integers(1, 300),
                         elements=st.integers(-3, 3).map(float))
any_logits = hnp.arrays(np.float32, st.integers(1, 2000),
                        elements=st.floats(width=32, allow_nan=False))


@settings(max_examples=200, deadline=None)
@given(st.one_of(tied_logits, any_logits))
def test_greedy_is_argmax_lowest_id_on_ties(logits: np.ndarray) -> None:
    with TokenSampler(GREEDY, len(logits)) as sampler:
        assert sampler.sample(logits) == int(np.argmax(logits))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 400).flatmap(lambda n: st.lists(
    hnp.arrays(np.float32, n, elements=st.one_of(
        st.integers(-2, 2).map(float),
        st.floats(-50, 50, width=32))), min_size=1, max_size=4)),
       st.floats(0.05, 5.0), st.integers(0, 2**32 - 2))
def test_top_k_1_is_greedy_at_any_temperature(rows: list[np.ndarray], temperature: float,
                                              seed: int) -> None:
    # Several rows through one sampler: top-k reorders the reused buffer in place.
    params = SamplingParams(temperature=temperature, top_k=1, seed=seed)
    with TokenSampler(params, len(rows[0])) as sampler:
        for row in rows:
            assert sampler.sample(row) == int(np.argmax(row))


# --- seeds ------------------------------------------------------------------------------


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    rng = np.random.default_rng(0)
    n_vocab, steps = 1000, 300
    rows = rng.normal(0, 2, (steps, n_vocab)).astype(np.float32)

    def run(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, top_k=100, top_p=0.99, min_p=0.0, seed=seed)
        with TokenSampler(params, n_vocab) as sampler:
            return [sampler.sample(row) for row in rows]

    first, again, other = run(1234), run(1234), run(1235)
    assert first == again
    assert sum(a != b for a, b in zip(first, other, strict=True)) > steps // 2
    # RANDOM_SEED draws a fresh seed per sampler.
    assert run(RANDOM_SEED) != run(RANDOM_SEED)


def test_random_seed_is_reported_and_reproduces() -> None:
    logits = np.zeros(500, np.float32)
    with TokenSampler(SamplingParams(temperature=1.0, top_k=0, seed=RANDOM_SEED), 500) as s:
        seed = s.seed_used
        assert seed != RANDOM_SEED
        tokens = [s.sample(logits) for _ in range(50)]
    assert draws(SamplingParams(temperature=1.0, top_k=0, seed=seed), logits, 50) == tokens


# --- repeat penalty ---------------------------------------------------------------------


@pytest.mark.parametrize(("lead", "runner_up"), [(2.0, 1.9), (-1.0, -1.1)])
def test_repeat_penalty_demotes_an_accepted_token(lead: float, runner_up: float) -> None:
    logits = np.full(50, -5.0, np.float32)
    logits[[7, 3]] = lead, runner_up  # 7 leads slightly
    params = SamplingParams(temperature=0.0, repeat_penalty=1.3, repeat_last_n=4)
    with TokenSampler(params, 50) as sampler:
        # sample() never adds to the history: asking again and again changes nothing.
        assert [sampler.sample(logits) for _ in range(5)] == [7] * 5
        sampler.accept([7])
        assert sampler.sample(logits) == 3
        sampler.accept([11, 12, 13])  # 7 is still among the last 4 inputs
        assert sampler.sample(logits) == 3
        sampler.accept([14])  # now it is not
        assert sampler.sample(logits) == 7


def test_repeat_penalty_lowers_the_share_of_repeated_tokens() -> None:
    logits = np.ones(2, np.float32)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                            repeat_penalty=1.5, seed=3)
    with TokenSampler(params, 2) as sampler:
        sampler.accept([0])
        share = np.mean([sampler.sample(logits) == 0 for _ in range(4000)])
    # logit 1 -> 1/1.5: p(0) = 1 / (1 + e^(1/3)) = 0.42
    assert 0.38 < share < 0.46


def test_accept_keeps_only_the_window() -> None:
    """A long prompt leaves the same penalty state as its last repeat_last_n tokens."""
    logits = np.linspace(0.0, 1.0, 200, dtype=np.float32)[::-1].copy()  # 0 best, then 1...
    params = SamplingParams(temperature=0.0, repeat_penalty=100.0, repeat_last_n=3)
    with TokenSampler(params, 200) as sampler:
        sampler.accept(iter([0, 1, 2, 3, 4, 5]))  # window: 3, 4, 5
        assert sampler.sample(logits) == 0
        assert sampler.sample(np.roll(logits, 4)) == 6  # 4 leads, but is in the window


# --- temperature ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_follows_softmax(temperature: float) -> None:
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5], np.float32)
    n = 20000
    params = SamplingParams(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, seed=99)
    counts = np.bincount(draws(params, logits, n), minlength=len(logits))
    expected = np.exp(logits / temperature)
    expected = n * expected / expected.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 7 degrees of freedom: chi2 > 40 has p < 1e-6.
    assert chi2 < 40, (counts, expected.round())


def test_truncation_keeps_only_allowed_tokens() -> None:
    logits = np.array([5.0, 4.9, 4.8, 0.0, -1.0, 3.0], np.float32)
    top_k = draws(SamplingParams(temperature=1.5, top_k=2, top_p=1.0, min_p=0.0, seed=1),
                  logits, 500)
    assert set(top_k) == {0, 1}
    # min_p 0.5: tokens within log(2) of the best logit.
    min_p = draws(SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.5, seed=1),
                  logits, 500)
    assert set(min_p) == {0, 1, 2}


# --- the real model ---------------------------------------------------------------------


def test_engine_logits_sample_like_llama_sampler_sample(smollm2_path, threads) -> None:
    """Our apply-then-accept-on-input loop picks llama_sampler_sample's tokens, seed for seed."""
    from orchcore.engine import EngineConfig, StageEngine
    from testkit.reference import ReferenceModel

    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.05,
                            repeat_penalty=1.3, repeat_last_n=16, seed=42)
    steps = 24

    ref = ReferenceModel(smollm2_path, threads=threads)
    try:
        prompt = ref.tokenize("Once upon a time, in a small village,")
        with TokenSampler(params, ref.n_vocab) as own:
            for token in prompt:
                llama_cpp.llama_sampler_accept(own.chain, token)
            ref.eval(prompt, all_logits=False)
            expected: list[int] = []
            for _ in range(steps):
                expected.append(llama_cpp.llama_sampler_sample(own.chain, ref.ctx, -1))
                ref.eval([expected[-1]], all_logits=False)
    finally:
        ref.close()

    config = EngineConfig(threads=threads, context_tokens=128, max_sessions=1)
    with StageEngine(smollm2_path, config) as engine, TokenSampler(params, engine.n_vocab) as s:
        s.accept(prompt)
        logits = engine.forward("s", range(len(prompt)), tokens=prompt)
        got: list[int] = []
        for _ in range(steps):
            got.append(s.sample(logits))
            s.accept(got[-1:])
            logits = engine.forward("s", [len(prompt) + len(got) - 1], tokens=got[-1:])
    assert got == expected
    assert len(set(got)) > steps // 3  # really sampled, not stuck on one token
