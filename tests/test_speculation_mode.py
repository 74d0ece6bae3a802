"""How a run names its speculation, and acceptance measured on an answer without verifying
anything: pure, no engine."""

from __future__ import annotations

import pytest

from orchcore.errors import InvalidSettingError
from orchcore.speculation.decode import shadow_counts
from orchcore.speculation.drafters import PromptLookup
from orchcore.speculation.mode import DEFAULT_K, SpeculationMode, parse_mode
from orchestrator.settings import OrchSettings


@pytest.mark.parametrize(("text", "mode"), [
    ("off", SpeculationMode("off", 0)), ("auto", SpeculationMode("auto", 16)),
    ("ngram", SpeculationMode("ngram", DEFAULT_K)), ("NGRAM:7", SpeculationMode("ngram", 7)),
])
def test_modes(text, mode):
    assert parse_mode(text) == mode
    assert OrchSettings.load(speculate=text).speculation() == mode


@pytest.mark.parametrize(("text", "says"), [
    ("draft:", "needs a model"), ("early:4", "early exit.*not built"),
    ("ngram:0", "1..16"), ("ngram:x", "1..16"), ("fast", "choose off, auto, ngram"),
])
def test_refused_modes_say_what_to_write(text, says):
    with pytest.raises(InvalidSettingError, match=says):
        OrchSettings.load(speculate=text)


def test_shadow_acceptance_counts_what_verified_passes_would_keep():
    prompt = [1, 2, 3, 4, 5, 6]
    # Pending 1; lookup of [..., 1] drafts 2 3 4 5: the answer keeps 2 3, then says 9
    # (one rejection); pending 9 has no earlier occurrence: a pass without drafts.
    answer = [1, 2, 3, 9, 7]
    assert shadow_counts(PromptLookup(), prompt, answer, 4) == (2, 1)
    assert shadow_counts(PromptLookup(), prompt, [1, 2, 3, 4, 5], 4) == (4, 0)
    assert shadow_counts(PromptLookup(), prompt, [8], 4) == (0, 0)
