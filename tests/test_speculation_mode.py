"""How a run names its speculation, and acceptance measured on an answer without verifying
anything: pure, no engine."""

from __future__ import annotations

import pytest

from orchcore.errors import InvalidSettingError
from orchcore.speculation.cost import PassCosts, choose_by_replay, replayed_speedup
from orchcore.speculation.decode import Lookahead, lookaheads
from orchcore.speculation.drafters import PromptLookup
from orchcore.speculation.mode import DEFAULT_K, SpeculationMode, parse_mode
from orchestrator.settings import OrchSettings


@pytest.mark.parametrize(("text", "mode"), [
    ("off", SpeculationMode("off", 0)), ("auto", SpeculationMode("auto", 16)),
    ("ngram", SpeculationMode("ngram", DEFAULT_K)), ("NGRAM:7", SpeculationMode("ngram", 7)),
    ("early:12", SpeculationMode("early", DEFAULT_K, exit_layers=12)),
])
def test_modes(text, mode):
    assert parse_mode(text) == mode
    assert OrchSettings.load(speculate=text).speculation() == mode


@pytest.mark.parametrize(("text", "says"), [
    ("draft:", "needs a model"), ("early:0", "at least 1"), ("early:", "at least 1"),
    ("ngram:0", "1..16"), ("ngram:x", "1..16"), ("fast", "choose off, auto, ngram"),
])
def test_refused_modes_say_what_to_write(text, says):
    with pytest.raises(InvalidSettingError, match=says):
        OrchSettings.load(speculate=text)


def test_lookaheads_measure_what_lookup_proposed_against_what_came():
    prompt = [1, 2, 3, 4, 5, 6]
    # Pending 1: lookup of [..., 1] proposes 2 3 4 5; the answer had 2 3, then 9.
    answer = [1, 2, 3, 9, 7]
    assert lookaheads(PromptLookup(), prompt, answer, 0, 4) == [Lookahead(4, 2)], \
        "only positions with 4 known tokens after them"
    assert lookaheads(PromptLookup(), prompt, answer, 0, 4, partial=True) == [
        Lookahead(4, 2), Lookahead(3, 1), Lookahead(2, 0), Lookahead(0, 0)], \
        "later ones cut to what is known; 9 never occurred before: nothing proposed"
    assert lookaheads(PromptLookup(), prompt, answer, 1, 4, partial=True)[0] == (3, 1)


def test_auto_replays_the_passes_each_k_would_have_made():
    costs = PassCosts({2: 1.2, 3: 1.4, 5: 2.0}, step_ms=10.0)
    copying = [Lookahead(4, 4)] * 10  # every proposal right, none beyond four
    assert replayed_speedup(copying, 4, costs) == pytest.approx(10 * 10 / (2 * 20.0))
    nothing = [Lookahead(0, 0)] * 10
    assert replayed_speedup(nothing, 4, costs) == 1.0, "no proposal: plain passes"
    wrong = [Lookahead(4, 0)] * 10
    assert replayed_speedup(wrong, 4, costs) == pytest.approx(0.5)
    assert choose_by_replay(copying, costs, (1, 2, 4)) == 4
    assert choose_by_replay(nothing, costs, (1, 2, 4)) == 0
    assert choose_by_replay(wrong, costs, (1, 2, 4)) == 0, "off when it would lose"
    bursty = [Lookahead(4, 4)] * 5 + [Lookahead(4, 0)] * 5  # a copy, then free text
    assert choose_by_replay(bursty, costs, (1, 2, 4)) == 1, \
        "short drafts: a long one rejected costs c(5) for one token"
    assert replayed_speedup(bursty, 4, costs) < 1 < replayed_speedup(bursty, 1, costs)
