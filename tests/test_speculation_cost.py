"""The cost model and the policy that picks the draft length or turns speculation off,
with the batch costs measured on this kind of machine (FINDINGS 11)."""

from __future__ import annotations

import numpy as np
import pytest

from orchcore.errors import InvalidSettingError
from orchcore.sampling import SamplingParams
from orchcore.speculation.cost import (
    AcceptanceMeter,
    PassCosts,
    ahead_pass_ms,
    choose_draft_length,
    expected_tokens,
    predicted_speedup,
    speculation_allowed,
)

# one llama_decode of n positions, in single steps, 1 thread (FINDINGS 11)
Q4_1 = PassCosts({2: 2.64, 4: 4.61, 8: 7.57, 16: 13.17})
Q4_0 = PassCosts({2: 2.50, 4: 2.60, 8: 4.32, 16: 6.64})


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0, "nothing kept: the target's own token"
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    with pytest.raises(InvalidSettingError):
        expected_tokens(1.5, 2)


def test_rows_cost_measured_interpolated_and_extended():
    assert Q4_0.rows_cost(1) == 1.0 and Q4_0.rows_cost(4) == 2.60
    assert Q4_0.rows_cost(3) == pytest.approx(2.55)
    assert Q4_0.rows_cost(20) == pytest.approx(6.64 + 4 * (6.64 - 4.32) / 8)
    assert PassCosts({2: 1.8}).rows_cost(3) == pytest.approx(2.6)


def test_speedup_is_tokens_per_pass_over_batch_cost_without_links():
    assert predicted_speedup(0.8, 3, Q4_0) == pytest.approx(expected_tokens(0.8, 3) / 2.60)
    assert predicted_speedup(1.0, 15, Q4_1) == pytest.approx(16 / 13.17), "the ceiling"
    assert Q4_1.ceiling(15) == pytest.approx(1.215, abs=1e-3)


def test_q4_1_turns_speculation_off_q4_0_keeps_it():
    """Q4_1 on this CPU gains at most ~1.2x with perfect drafts; with realistic acceptance
    it loses, so the policy turns speculation off. Q4_0's cheap batches pay at once."""
    for a in (0.5, 0.7, 0.9):
        assert choose_draft_length(a, Q4_1) == 0, a
    assert choose_draft_length(0.8, Q4_0) == 3
    assert choose_draft_length(0.95, Q4_0) > 3, "better drafts, longer drafts"
    assert choose_draft_length(0.2, Q4_0) == 0


def test_slow_links_make_speculation_pay():
    """A pass's link time is paid once for all its tokens."""
    linked = PassCosts(Q4_1.batch_cost, step_ms=10.0, link_ms=20.0)
    assert choose_draft_length(0.8, linked) > 0
    assert predicted_speedup(0.8, 3, linked) == pytest.approx(
        expected_tokens(0.8, 3) * 30.0 / (4.61 * 10.0 + 20.0))


def test_drafting_time_counts():
    slow_drafts = PassCosts(Q4_0.batch_cost, step_ms=10.0, draft_ms=5.0)
    assert predicted_speedup(0.8, 3, slow_drafts) < predicted_speedup(0.8, 3, Q4_0)


def test_acceptance_meter_recovers_the_rate():
    rng = np.random.default_rng(3)
    meter = AcceptanceMeter()
    assert meter.rate == 0.5, "the prior alone"
    for _ in range(5000):
        k = int(rng.integers(1, 8))
        kept = 0
        while kept < k and rng.random() < 0.7:
            kept += 1
        meter.record(k, kept)
    assert abs(meter.rate - 0.7) < 0.02, meter.rate
    meter.record(0, 0)
    assert meter.passes == 5000, "an empty draft is not a pass"
    with pytest.raises(InvalidSettingError):
        meter.record(2, 3)


def test_costs_are_checked():
    with pytest.raises(InvalidSettingError, match="sizes >= 1"):
        PassCosts({0: 1.0})
    with pytest.raises(InvalidSettingError, match="step_ms"):
        PassCosts({2: 2.0}, step_ms=0.0)


def test_penalised_sessions_do_not_speculate():
    assert speculation_allowed(SamplingParams(temperature=0.7))
    assert not speculation_allowed(SamplingParams(repeat_penalty=1.1))


def test_passes_sent_ahead_overlap_when_their_bet_wins():
    """Over two stages a won bet lets the last stage verify one pass while stage 0
    computes the next: the pair takes the longer half, not both. A lost bet costs no time
    (stage 0 would have waited), so the prediction never falls below one at a time."""
    linked = PassCosts(Q4_0.batch_cost, step_ms=20.0, link_ms=2.0)
    assert ahead_pass_ms(linked, 4, stages=2) == pytest.approx(2.60 * 20.0 / 2 + 2.0)
    assert ahead_pass_ms(linked, 4, stages=4) == pytest.approx(
        (2.60 * 20.0 * 3 / 4 + 2.0) / 3), "three bets in flight: one per stage before the last"
    assert ahead_pass_ms(linked, 4, stages=1) == pytest.approx(2.60 * 20.0 + 2.0)
    sync = predicted_speedup(0.8, 3, linked)
    ahead = predicted_speedup(0.8, 3, linked, stages=2)
    won = 0.8 ** 4
    assert ahead == pytest.approx(expected_tokens(0.8, 3) * 22.0 / (
        won * (2.60 * 10.0 + 2.0) + (1 - won) * (2.60 * 20.0 + 2.0)))
    assert ahead > sync
    assert predicted_speedup(0.0, 3, linked, stages=2) == pytest.approx(
        predicted_speedup(0.0, 3, linked)), "bets that never win change nothing"
    assert choose_draft_length(0.75, linked, stages=2) >= choose_draft_length(0.75, linked)
