"""Plans weigh the bytes they move, and runs refine speeds that belong to the right thing.

Pure: facts of full-size shapes come from sparse files (``modelgen.write_model(...,
sparse=True)``: the real header and size, no weights), devices are values, the speed book
is a file in a temporary folder. No worker runs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from orchcore import modelgen
from orchcore.config import EngineConfig
from orchcore.devices import DeviceFacts
from orchcore.facts import read_model_facts
from orchcore.memory import MIB, PROCESS_BASELINE_BYTES, StageMemory
from orchcore.probe import layer_shape
from orchestrator.planning.plan import PlanOptions, make_plan
from orchestrator.planning.speeds import SpeedBook, head_layers, stage_layers

GIB = 1 << 30
CONTEXT = EngineConfig(context_tokens=512, max_sessions=1)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    return {name: read_model_facts(modelgen.write_model(
        folder / f"{name}.gguf", modelgen.preset(name), sparse=True))
        for name in ("qwen3moe-30b-a3b", "qwen3-8b")}


def workers(speeds: list[float], budget_mib: int, *, host: str = "box",
            bandwidth: float | None = None) -> list[DeviceFacts]:
    """Identical workers of one machine (1 thread each), probed at ``speeds`` s/layer."""
    return [DeviceFacts(address=f"127.0.0.1:{50151 + i}", worker_id=f"w{i}", host_id=host,
                        hostname=host, arch="x86_64", cores=2, ram_total_bytes=64 * GIB,
                        ram_available_bytes=48 * GIB, memory_budget_bytes=budget_mib * MIB,
                        decode_s_per_layer=s, link_s=0.001, bandwidth_bytes_s=bandwidth,
                        threads=1) for i, s in enumerate(speeds)]


def cut(plan) -> tuple[tuple[str, int, int], ...]:
    return tuple((s.device.worker_id, s.layers.start, s.layers.end) for s in plan.stages)


def ranges(plan) -> list[tuple[int, int]]:
    return [(s.layers.start, s.layers.end) for s in plan.stages]


def measured_run(plan, facts, s_per_layer: float, tokens: int = 64) -> dict[int, float]:
    """Each stage's compute over ``tokens`` decode steps, in ms, as a run reports it, from
    one true time per layer: the last stage also runs the head."""
    return {s.index: stage_layers(facts, s.layers.start, s.layers.end) * s_per_layer
            * tokens * 1e3 for s in plan.stages}


def test_sparse_facts_have_the_real_size_and_no_disk(shapes, tmp_path):
    moe = shapes["qwen3moe-30b-a3b"]
    assert moe.file_size > 16.5e9 and moe.n_layers == 48 and moe.n_expert == 128
    assert moe.parts[0].stat().st_blocks * 512 < 64 * MIB, "a sparse file takes no disk"
    assert round(head_layers(moe)) == 6, "the 151,936-row head reads as much as 6 layers"


def test_identical_workers_keep_identical_figures_whichever_stage_they_ran(shapes, tmp_path):
    facts = shapes["qwen3moe-30b-a3b"]
    devices = workers([0.0013, 0.00134, 0.00128], 7000)
    options = PlanOptions(engine=CONTEXT, use_all=True)
    plan = make_plan(facts, devices, options)
    book, shape = SpeedBook(tmp_path / "speeds.json"), layer_shape(facts).key
    book.refine(plan, facts, shape, measured_run(plan, facts, 0.0015), 64)
    figures = [book.speed(d, shape) for d in devices]
    assert figures == [pytest.approx(0.0015)] * 3, \
        f"the head's share is the model's, not the last worker's: {figures}"
    other = replace(devices[0], host_id="another-machine")
    assert book.speed(other, shape) is None, "another machine learns its own figure"


def test_the_full_size_moe_keeps_its_cut_on_the_second_and_third_run(shapes, tmp_path):
    facts = shapes["qwen3moe-30b-a3b"]
    probed = workers([0.0013, 0.00134, 0.00128], 7000)
    options = PlanOptions(engine=CONTEXT, use_all=True)
    first = make_plan(facts, probed, options)
    book, shape = SpeedBook(tmp_path / "speeds.json"), layer_shape(facts).key
    plan = first
    for run in (2, 3):
        book.refine(plan, facts, shape, measured_run(plan, facts, 0.0016), 64)
        devices = [replace(d, decode_s_per_layer=book.speed(d, shape)) for d in probed]
        plan = make_plan(facts, devices, replace(options, prefer=cut(plan)))
        assert cut(plan) == cut(first), f"run {run} moved the cut: {plan.describe()}"
        assert plan.choice is None, "the same cut is no choice to explain"


def test_a_last_stage_filed_as_slow_still_keeps_the_cut_that_16_gb_would_move(shapes):
    """What a run files when the head's share is counted as the worker's time (39.9 ms
    measured against 33.4 predicted): the best new cut gains a few ms per token, and would
    send gigabytes for it."""
    facts = shapes["qwen3moe-30b-a3b"]
    probed = workers([0.0013, 0.0013, 0.0013], 7000)
    options = PlanOptions(engine=CONTEXT, use_all=True)
    first = make_plan(facts, probed, options)
    last = first.stages[-1]
    slow = 0.0013 * stage_layers(facts, last.layers.start, last.layers.end) / len(last.layers)
    devices = [replace(d, decode_s_per_layer=slow) if d == last.device else d
               for d in probed]
    again = make_plan(facts, devices, replace(options, prefer=cut(first)))
    assert cut(again) == cut(first), "\n".join(again.describe())
    choice = again.choice
    assert choice.kept and choice.moved_bytes > 4e9 and choice.payback_tokens > 4096
    text = "\n".join(again.describe())
    assert "kept the cut the workers hold" in text and "paid back only after" in text, text
    forced = make_plan(facts, devices, replace(options, prefer=cut(first), replan=True))
    assert cut(forced) != cut(first) and forced.choice.forced
    assert "new cut on request (--replan)" in "\n".join(forced.describe())


def test_a_predicted_loss_or_tie_never_moves_a_shard(shapes):
    facts = shapes["qwen3-8b"]
    devices = workers([0.004, 0.004, 0.004], 2300)
    options = PlanOptions(engine=CONTEXT, use_all=True)
    best = make_plan(facts, devices, options)
    # the same ranges on the workers in another order: the same predicted time
    swapped = tuple((w, a, b) for (w, _, _), (_, a, b) in
                    zip(reversed(cut(best)), cut(best), strict=True))
    held = make_plan(facts, devices, replace(options, prefer=swapped))
    assert cut(held) == swapped and held.choice.kept and held.choice.gain_s <= 0


def test_a_small_gain_that_does_not_pay_for_its_bytes_keeps_the_cut(shapes):
    facts = shapes["qwen3-8b"]
    # the third worker is 30% slower; the workers hold an even cut from before
    devices = workers([0.004, 0.004, 0.0052], 2300, bandwidth=20e6)
    options = PlanOptions(engine=CONTEXT, use_all=True)
    best = make_plan(facts, devices, options)
    held = (("w0", 0, 12), ("w1", 12, 24), ("w2", 24, 36))
    kept = make_plan(facts, devices, replace(options, prefer=held))
    choice = kept.choice
    assert cut(kept) == held, "\n".join(kept.describe())
    assert choice.kept and choice.gain_s > choice.held_s * 0.05, "a gain beyond noise"
    assert choice.payback_tokens > options.horizon_tokens
    # a long enough horizon pays for the same bytes
    moved = make_plan(facts, devices, replace(options, prefer=held, horizon_tokens=10**6))
    assert cut(moved) == cut(best) and not moved.choice.kept
    assert "new cut:" in "\n".join(moved.describe())


def test_a_large_gain_moves(shapes):
    facts = shapes["qwen3-8b"]
    devices = workers([0.004, 0.004, 0.012], 2300, bandwidth=100e6)  # one 3x slower
    options = PlanOptions(engine=CONTEXT, use_all=True)
    held = (("w0", 0, 12), ("w1", 12, 24), ("w2", 24, 36))
    plan = make_plan(facts, devices, replace(options, prefer=held))
    choice = plan.choice
    assert not choice.kept and cut(plan) != held
    assert choice.payback_tokens < options.horizon_tokens
    kept_ranges = {(w, a, b) for w, a, b in held}
    unmoved = sum(plan.stages[i].memory.weights for i, c in enumerate(cut(plan))
                  if c in kept_ranges)
    moving = sum(s.memory.weights for s in plan.stages) - unmoved
    assert choice.moved_bytes == moving, "only shards a worker lacks move"
    assert plan.to_json()["cut"]["moved_bytes"] == moving


def test_a_measured_baseline_decides_what_fits(smollm2_path):
    facts = read_model_facts(smollm2_path)
    memory = StageMemory(facts, CONTEXT)
    assert memory(0, 10).baseline == PROCESS_BASELINE_BYTES  # unknown: the constant
    assert memory(0, 10, 90 * MIB).baseline == 90 * MIB
    # the least a worker of two must hold, at the assumed baseline
    need = min(max(memory(0, k).total, memory(k, 30).total) for k in range(1, 30))
    budget_mib = (need - 50 * MIB) // MIB  # 50 MiB short, 60 MiB over with 100 MiB measured
    devices = [replace(d, decode_s_per_layer=None) for d in workers([0, 0], budget_mib)]
    with pytest.raises(Exception, match="does not fit"):
        make_plan(facts, devices, PlanOptions(engine=CONTEXT, use_all=True))
    measured = [replace(d, baseline_bytes=100 * MIB) for d in devices]
    plan = make_plan(facts, measured, PlanOptions(engine=CONTEXT, use_all=True))
    assert all(s.memory.baseline == 100 * MIB for s in plan.stages)


def test_the_last_stage_counts_the_logits_rows_it_holds(shapes):
    """A row per session (the graph keeps only the rows asked for: measured), and the rows
    a chunk may score for prompt logprobs; none before the last stage."""
    facts = shapes["qwen3-8b"]
    plain = EngineConfig(context_tokens=512, max_sessions=2, batch_tokens=256, output_rows=1)
    scoring = EngineConfig(context_tokens=512, max_sessions=2, batch_tokens=256,
                           output_rows=64)
    last = StageMemory(facts, plain)(35, 36)
    assert last.logits >= 151936 * 4 * 2, "a row per session"
    assert last.logits < 151936 * 4 * 256, "not a whole chunk: the graph keeps asked rows"
    assert StageMemory(facts, scoring)(35, 36).logits >= last.logits + 151936 * 4 * 64
    assert StageMemory(facts, plain)(1, 2).logits == 0
