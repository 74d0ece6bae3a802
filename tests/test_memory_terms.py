"""The memory estimate's terms at the 8B's shape (36 layers, 4096 wide, untied 151,936-row
head) and the Qwen3-30B-A3B's, each against what was measured term by term in worker
processes (docs/benchmarks.md, bench/stage_memory.py). Pure: header-only models, no
process."""

from __future__ import annotations

import pytest

from orchcore import modelgen
from orchcore.config import EngineConfig
from orchcore.facts import read_model_facts
from orchcore.memory import MIB, VERIFY_ROWS, StageMemory
from orchcore.speculation.mode import MAX_K

N_VOCAB = 151936
# As orch run deploys it, as bench/stage_memory.py ran it: nothing scores prompt rows.
PLAIN = EngineConfig(context_tokens=512, max_sessions=1, batch_tokens=256, output_rows=1)


def _memory(tmp_path_factory, preset: str) -> StageMemory:
    path = modelgen.write_model(tmp_path_factory.mktemp("shape") / f"{preset}.gguf",
                                modelgen.preset(preset), sparse=True)
    return StageMemory(read_model_facts(path), PLAIN)


@pytest.fixture(scope="module")
def memory(tmp_path_factory) -> StageMemory:
    return _memory(tmp_path_factory, "qwen3-8b")


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> StageMemory:
    return _memory(tmp_path_factory, "qwen3moe-30b-a3b")


def test_the_last_stage_counts_a_verification_chunks_logits_though_nothing_scores(memory):
    """A verification chunk (the pending token and up to MAX_K drafts) returns logits for
    every row, and llama.cpp's output buffer keeps that size: 17 rows of 151,936 floats
    added 21 MiB to the one-layer last stage (19.7 MiB counted)."""
    assert VERIFY_ROWS == MAX_K + 1
    last = memory(35, 36)
    assert last.logits >= N_VOCAB * 8 * VERIFY_ROWS
    assert N_VOCAB * 8 * VERIFY_ROWS >= 19 * MIB
    assert memory(34, 35).logits == 0, "no logits before the last stage"


def test_a_one_layer_last_stage_runs_its_feed_forward_on_the_output_rows_only(memory):
    """llama.cpp drops the rows nobody asked for before the last layer's feed-forward, so
    the one-layer last stage touched about 40 MiB of compute buffer in a 256-row chunk,
    not the 80 of a stage whose layers all run every row."""
    one, two = memory(35, 36).compute, memory(34, 36).compute
    assert two == memory(17, 35).compute == 80 * MIB, "every row through the feed-forward"
    assert 32 * MIB <= one <= 40 * MIB


def test_hidden_states_count_where_they_are_received_and_sent(memory):
    """A middle stage receives a chunk's hidden states and sends them on; the first only
    sends, the last only receives, a whole model on one worker neither."""
    first, middle, last = memory(0, 13).hidden, memory(13, 26).hidden, memory(26, 36).hidden
    assert middle == first + last
    assert first > last > 0
    assert memory(0, 36).hidden == 0


def test_a_mixture_of_experts_counts_each_used_experts_output(moe):
    """Each of the 8 used experts' outputs is a 2048-wide row before they are summed: a
    256-row chunk touched 56 MiB of compute buffer on 12 layers of the Qwen3-30B-A3B shape
    (fresh process; 58 with the head's row), where the n_ff-wide part alone is 40."""
    assert moe(18, 36).compute == 56 * MIB
    assert moe(36, 48).compute == 56 * MIB


@pytest.mark.parametrize(("start", "end", "peak_mib"), [(0, 13, 1824), (13, 26, 1623),
                                                         (26, 36, 1795)])
def test_each_stage_estimate_is_above_its_measured_peak_within_the_tolerance(
        memory, start, end, peak_mib):
    """Peaks of bench/stage_memory.py --models qwen3-8b (a full chunk, 64 decode tokens, a
    17-row verification; workers that measured a 105 MiB baseline)."""
    estimate = memory(start, end, 105 * MIB).total
    assert 0 <= estimate - peak_mib * MIB <= max(40 * MIB, estimate // 100)
