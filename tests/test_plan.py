"""The plan is pure: model facts + device facts -> one Plan, without sockets or files
beyond the model's header; it checks memory against each device and each shared host."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchcore.config import EngineConfig
from orchcore.devices import DeviceFacts
from orchcore.errors import InvalidSettingError, PlanError
from orchcore.facts import read_model_facts
from orchcore.memory import MIB, StageMemory, estimate_shard, estimate_stage
from orchcore.shard import LayerRange, write_shard
from orchestrator.planning.plan import PlanOptions, host_shares, make_plan
from orchestrator.planning.speeds import head_layers, lookup_layers
from orchestrator.settings import OrchSettings, parse_workers
from testkit.models import generated_model

GIB = 1 << 30


def device(i: int, budget: int = 4 * GIB, host: str | None = None, cores: int = 4,
           available: int = 8 * GIB, speed: float | None = None) -> DeviceFacts:
    return DeviceFacts(address=f"10.0.0.{i}:50151", worker_id=f"id{i}", host_id=host or f"h{i}",
                       hostname=f"pi{i}", arch="aarch64", cores=cores,
                       ram_total_bytes=8 * GIB, ram_available_bytes=available,
                       memory_budget_bytes=budget, decode_s_per_layer=speed)


ALL = PlanOptions(use_all=True)


@pytest.fixture(scope="module")
def facts(smollm2_path):
    return read_model_facts(smollm2_path)


def test_plan_is_contiguous_and_carries_each_stage_engine(facts):
    options = PlanOptions(codec="q8_0", engine=EngineConfig(context_tokens=1024), use_all=True)
    plan = make_plan(facts, [device(1, cores=4), device(2, cores=2)], options)
    first, last = (s.layers for s in plan.stages)
    assert first.start == 0 and first.end == last.start and last.end == 30
    # equally fast devices: the last stage, which also runs the lm head, gets fewer layers
    assert len(last) < len(first)
    assert [s.engine.threads for s in plan.stages] == [4, 2]  # 0 = the device's cores
    assert all(s.engine.context_tokens == 1024 for s in plan.stages)
    assert plan.codec == "q8_0" and plan.stages[1].worker == "10.0.0.2:50151"
    text = "\n".join(plan.describe())
    assert f"layers {first} on 10.0.0.1:50151 (pi1)" in text and "MiB" in text
    assert "4 threads" in text and "2 threads" in text
    one = make_plan(facts, [device(1, cores=1)], options)
    assert "1 thread\n" in "\n".join(one.describe()) + "\n", one.describe()
    assert make_plan(facts, [device(1, cores=4), device(2, cores=2)], options) == plan


def test_a_model_that_cannot_fit_gives_the_shortfall(facts):
    with pytest.raises(PlanError, match=r"needs about \d+ MiB across 2 workers, \d+ MiB more "
                                        r"than their budgets \(10\.0\.0\.1:50151 200 MiB, "
                                        r"10\.0\.0\.2:50151 100 MiB\)") as refused:
        make_plan(facts, [device(1, budget=200 * MIB), device(2, budget=100 * MIB)])
    # 100 MiB holds no worker process at all: no context is short enough
    assert "Add workers or memory (a shorter context or fewer sessions would not be enough)" \
        in str(refused.value)
    assert "--context" not in str(refused.value) and "--max-sessions" not in str(refused.value)


@pytest.mark.parametrize(("context", "sessions"), [(512, 2), (2048, 1)])
def test_the_shortfall_suggests_only_what_would_fit(facts, context, sessions):
    """A budget that holds the model at ``context`` x ``sessions``, planned at 2048 x 2: the
    advice names the longest context and the most sessions that fit, and only those."""
    whole = StageMemory(facts, EngineConfig(context_tokens=context, max_sessions=sessions))
    budget = whole(0, facts.n_layers).total + MIB // 2
    options = PlanOptions(engine=EngineConfig(context_tokens=2048, max_sessions=2))
    with pytest.raises(PlanError) as refused:
        make_plan(facts, [device(1, budget=budget)], options)
    advice = str(refused.value)

    def fits(context_tokens: int, max_sessions: int) -> bool:
        engine = EngineConfig(context_tokens=context_tokens, max_sessions=max_sessions)
        return StageMemory(facts, engine)(0, facts.n_layers).total <= budget

    if sessions == 2:
        assert "--max-sessions" not in advice, advice
        shortest = int(advice.split("now 2048; ")[1].split(" fits")[0])
        assert shortest >= context and fits(shortest, 2) and not fits(shortest + 1, 2), advice
    else:
        assert "hold fewer sessions (--max-sessions, now 2; 1 fits)" in advice, advice
        assert "shorten the context (--context, now 2048;" in advice, advice  # 1 session's room


def test_workers_on_one_host_share_its_ram(facts):
    small_host = 400 * MIB  # each stage fits its own budget, the two do not fit together
    devices = [device(1, host="same", available=small_host),
               device(2, host="same", available=small_host)]
    with pytest.raises(PlanError, match=r"MiB more than their budgets .*200 MiB.*200 MiB"):
        make_plan(facts, devices, ALL)
    plan = make_plan(facts, [device(1, host="same"), device(2, host="same")], ALL)
    assert [s.budget for s in plan.stages] == [4 * GIB, 4 * GIB]  # 8 GiB: fits


def test_latency_uses_the_fewest_hops_and_names_standbys(facts):
    plan = make_plan(facts, [device(1), device(2)])  # both hold the model: one stage
    assert [s.layers for s in plan.stages] == [LayerRange(0, 30)]
    assert "not needed" in plan.left_out[0].reason
    assert "standby: 10.0.0.2:50151" in "\n".join(plan.describe())


def test_a_device_too_small_for_one_layer_is_left_out(facts):
    plan = make_plan(facts, [device(1, budget=150 * MIB), device(2), device(3)],
                     PlanOptions(objective="throughput"))
    assert plan.stages and all(s.worker != "10.0.0.1:50151" for s in plan.stages)
    assert "too small for one layer" in plan.left_out[0].reason


def test_a_faster_device_gets_more_layers(facts):
    options = PlanOptions(objective="throughput", use_all=True)
    equal = make_plan(facts, [device(1, speed=0.002), device(2, speed=0.002)], options)
    faster = make_plan(facts, [device(1, speed=0.001), device(2, speed=0.002)], options)
    assert len(faster.stages[0].layers) > len(equal.stages[0].layers)
    head, lookup = head_layers(facts), lookup_layers(facts)
    assert faster.predicted_decode_s == pytest.approx(
        sum(len(s.layers) * s.device.decode_s_per_layer for s in faster.stages)
        + head * faster.stages[-1].device.decode_s_per_layer
        + lookup * faster.stages[0].device.decode_s_per_layer)


def test_bad_device_lists_are_refused(facts):
    with pytest.raises(PlanError, match="no workers"):
        make_plan(facts, [])
    with pytest.raises(PlanError, match="at least one layer"):
        make_plan(facts, [device(i) for i in range(31)], ALL)
    twin = device(2)
    twin = DeviceFacts(**{**twin.__dict__, "worker_id": "id1"})
    with pytest.raises(PlanError, match="same worker"):
        make_plan(facts, [device(1), twin])
    with pytest.raises(Exception, match="unknown hidden-state codec 'bogus'"):
        make_plan(facts, [device(1)], PlanOptions(codec="bogus"))


def test_planner_and_worker_estimate_the_same_bytes(facts, smollm2_path, tmp_path):
    """One estimate: the planner's figure for a range equals the worker's for its shard."""
    config = EngineConfig(context_tokens=1024, max_sessions=3, batch_tokens=128)
    for layers in (LayerRange(0, 10), LayerRange(10, 20), LayerRange(20, 30),
                   LayerRange(0, 30)):
        shard = write_shard(smollm2_path, layers, tmp_path / f"{layers.start}.gguf")
        assert estimate_stage(facts, layers, config) == \
            estimate_shard(read_model_facts(shard.path), config)


def test_settings_defaults_are_the_engine_and_sampler_defaults(monkeypatch):
    settings = OrchSettings.load()
    assert settings.engine(threads=0) == EngineConfig()
    assert settings.sampling().temperature == 0.0
    monkeypatch.setenv("ORCH_CONTEXT_TOKENS", "4096")
    assert OrchSettings.load().context_tokens == 4096
    assert OrchSettings.load(context_tokens=512).context_tokens == 512  # flags win
    with pytest.raises(InvalidSettingError, match="codec: unknown codec 'bogus'"):
        OrchSettings.load(codec="bogus")
    with pytest.raises(InvalidSettingError, match="top_p"):
        OrchSettings.load(top_p=0)


@pytest.mark.parametrize(("text", "message"), [
    ("127.0.0.1:99999", "outside 1..65535"),
    ("a:1,a:1", "listed twice"),
    ("a:1,", "empty entry"),
    ("", "empty"),
    ("host", "not HOST:PORT"),
    ("host:http", "not HOST:PORT"),
])
def test_worker_lists_are_validated(text, message):
    with pytest.raises(InvalidSettingError, match=message):
        parse_workers(text)


def test_worker_lists_keep_order_and_come_from_a_cluster_file(tmp_path):
    assert parse_workers(" pi1:50151, [::1]:7 ") == ("pi1:50151", "[::1]:7")
    listed = tmp_path / "cluster.txt"
    listed.write_text("# the house\npi1:50151\n\nlaptop:50151  # upstairs\n")
    assert parse_workers(f"@{listed}") == ("pi1:50151", "laptop:50151")
    with pytest.raises(InvalidSettingError, match="cannot read the cluster file"):
        parse_workers(f"@{tmp_path / 'missing'}")


# --- the search equals brute force ------------------------------------------------------

@pytest.fixture(scope="module")
def small_facts(tmp_path_factory):
    from orchcore import modelgen

    return read_model_facts(generated_model(modelgen.preset("tiny-llama-gqa", n_layers=6),
                                            "six.gguf"))


def _brute_force(facts, devices, options):
    """Every ordered subset of devices and every cut: the best objective value."""
    from itertools import combinations, permutations

    memory = StageMemory(facts, options.engine)
    budgets = host_shares(devices)
    n = facts.n_layers
    best = None
    sizes = range(len(devices), len(devices) + 1) if options.use_all else \
        range(1, len(devices) + 1)
    for k in sizes:
        for order in permutations(range(len(devices)), k):
            for cuts in combinations(range(1, n), k - 1):
                bounds = [0, *cuts, n]
                stages = list(zip(order, bounds, bounds[1:], strict=False))
                if any(memory(a, b).total > budgets[d] for d, a, b in stages):
                    continue
                head, lookup = head_layers(facts), lookup_layers(facts)
                times = [(b - a + (head if b == n else 0) + (lookup if a == 0 else 0))
                         * devices[d].decode_s_per_layer + devices[d].link_s
                         for d, a, b in stages]
                value = sum(times) if options.objective == "latency" else max(times)
                best = value if best is None else min(best, value)
    return best


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_search_equals_brute_force_and_every_limit_holds(small_facts, data):
    memory = StageMemory(small_facts, EngineConfig())
    sizes = sorted({memory(a, b).total for a in range(6) for b in range(a + 1, 7)})
    count = data.draw(st.integers(1, 4))
    devices = [DeviceFacts(
        address=f"w{i}:1", worker_id=f"w{i}", host_id=f"h{i}", hostname="", arch="x86_64",
        cores=1, ram_total_bytes=GIB, ram_available_bytes=GIB,
        memory_budget_bytes=data.draw(st.sampled_from(sizes)) + data.draw(st.integers(0, 4096)),
        decode_s_per_layer=data.draw(st.sampled_from([0.001, 0.002, 0.003, 0.005])),
        link_s=data.draw(st.sampled_from([0.0, 0.0005, 0.004])))
        for i in range(count)]
    options = PlanOptions(objective=data.draw(st.sampled_from(["latency", "throughput"])),
                          use_all=data.draw(st.booleans()))
    want = _brute_force(small_facts, devices, options)
    if want is None:
        with pytest.raises(PlanError, match="does not fit"):
            make_plan(small_facts, devices, options)
        return
    plan = make_plan(small_facts, devices, options)
    times = [s.decode_s + s.device.link_s for s in plan.stages]
    got = sum(times) if options.objective == "latency" else max(times)
    assert got == pytest.approx(want, abs=1e-9)
    assert plan.stages[0].layers.start == 0
    assert plan.stages[-1].layers.end == 6
    assert all(a.layers.end == b.layers.start for a, b in zip(plan.stages, plan.stages[1:],
                                                               strict=False))
    assert all(s.memory.total <= s.budget <= s.device.memory_budget_bytes for s in plan.stages)
    if options.use_all:
        assert len(plan.stages) == count


def test_the_previous_cut_is_kept_while_it_is_nearly_as_good(facts):
    devices = [device(1, speed=0.0010), device(2, speed=0.0010)]
    options = PlanOptions(objective="throughput", use_all=True)
    best = make_plan(facts, devices, options)
    moved = [(s.device.worker_id, s.layers.start, s.layers.end) for s in best.stages]
    a, b = moved[0][2], moved[1][1]
    nearly = ((moved[0][0], 0, a + 1), (moved[1][0], b + 1, 30))  # one layer over: < 5% worse
    kept = make_plan(facts, devices, replace(options, prefer=nearly))
    assert [(s.layers.start, s.layers.end) for s in kept.stages] == [(0, a + 1), (a + 1, 30)]
    assert kept.choice.kept and "kept the cut the workers hold" in "\n".join(kept.describe())
    far = ((moved[0][0], 0, 3), (moved[1][0], 3, 30))  # much worse: the best cut instead
    moved_away = make_plan(facts, devices, replace(options, prefer=far))
    assert moved_away.stages == best.stages and not moved_away.choice.kept
    stranger = (("someone-else", 0, 15), (moved[1][0], 15, 30))
    new = make_plan(facts, devices, replace(options, prefer=stranger))
    assert new.stages == best.stages
    assert "new cut: a worker of the last cut is gone" in "\n".join(new.describe())


def test_a_slow_link_counts(facts):
    fast = device(1, speed=0.001)
    slow = DeviceFacts(**{**device(2, speed=0.001).__dict__, "bandwidth_bytes_s": 100e3})
    assert [s.worker for s in make_plan(facts, [slow, fast]).stages] == [fast.address]
    # through the slow link, 576 f32 values in and out cost 47 ms a token: more than
    # running all 30 layers (and the head) on the other device
    assert [s.worker for s in make_plan(facts, [fast, slow]).stages] == [fast.address]


def _measured(i: int, decode_ms: float, prefill_ms: float) -> DeviceFacts:
    """A device whose probe took ``decode_ms`` per layer for a decode step and
    ``prefill_ms`` per layer per token of a 64-token prompt."""
    return replace(device(i), decode_s_per_layer=decode_ms / 1e3,
                   prefill_s_per_layer=prefill_ms / 1e3)


def test_the_prompt_chunk_balances_filling_the_pipeline_against_cost_per_chunk(facts):
    options = PlanOptions(engine=EngineConfig(batch_tokens=512), use_all=True)
    # A fixed cost per chunk of 0.36 ms a layer and 0.044 ms a layer per token (about the
    # small model on one core). Pipelining pays for smaller chunks, but not below the point
    # where their fixed costs outweigh an earlier start; cheap chunks and short prompts are
    # cut finer; a single stage or an unmeasured device takes the largest chunk.
    two = make_plan(facts, [_measured(1, 0.4, 0.05), _measured(2, 0.4, 0.05)], options)
    assert 64 <= two.prompt_chunk(2048) < 512
    assert two.prompt_chunk(256) < two.prompt_chunk(2048)
    assert two.prompt_chunk(1) == 1
    free_chunks = make_plan(facts, [_measured(1, 0.05, 0.05), _measured(2, 0.05, 0.05)],
                            options)
    assert free_chunks.prompt_chunk(2048) == 16
    one = make_plan(facts, [_measured(1, 0.4, 0.05)], options)
    assert one.prompt_chunk(2048) == 512 and one.prompt_chunk(300) == 300
    unmeasured = make_plan(facts, [device(1), device(2)], options)
    assert unmeasured.prompt_chunk(2048) == 512


def test_speeds_a_probe_apart_count_as_equal(facts):
    """Two equal machines probed a few percent apart: the latency objective does not hand the one
    measured faster every layer but one; it balances them, as for equal speeds."""
    options = PlanOptions(use_all=True)
    noisy = make_plan(facts, [device(1, speed=0.00103), device(2, speed=0.00100)], options)
    equal = make_plan(facts, [device(1, speed=0.00100), device(2, speed=0.00100)], options)
    assert [s.layers for s in noisy.stages] == [s.layers for s in equal.stages]
    assert min(len(s.layers) for s in noisy.stages) > 5
    slower = make_plan(facts, [device(1, speed=0.0015), device(2, speed=0.0010)], options)
    assert len(slower.stages[0].layers) == 1  # a real difference still decides
