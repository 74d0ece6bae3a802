"""The plan is pure: model facts + device facts -> one Plan, without sockets or files
beyond the model's header; it checks memory against each device and each shared host."""

from __future__ import annotations

import pytest

from orchcore.config import EngineConfig
from orchcore.devices import DeviceFacts
from orchcore.errors import InvalidSettingError, PlanError
from orchcore.facts import read_model_facts
from orchcore.memory import MIB, estimate_shard, estimate_stage
from orchcore.shard import LayerRange, write_shard
from orchestrator.plan import PlanOptions, make_plan
from orchestrator.settings import OrchSettings, parse_workers

GIB = 1 << 30


def device(i: int, budget: int = 4 * GIB, host: str | None = None, cores: int = 4,
           available: int = 8 * GIB) -> DeviceFacts:
    return DeviceFacts(address=f"10.0.0.{i}:50151", worker_id=f"id{i}", host_id=host or f"h{i}",
                       hostname=f"pi{i}", arch="aarch64", cores=cores,
                       ram_total_bytes=8 * GIB, ram_available_bytes=available,
                       memory_budget_bytes=budget)


@pytest.fixture(scope="module")
def facts(smollm2_path):
    return read_model_facts(smollm2_path)


def test_plan_is_contiguous_and_carries_each_stage_engine(facts):
    plan = make_plan(facts, [device(1, cores=4), device(2, cores=2)],
                     PlanOptions(codec="q8_0", engine=EngineConfig(context_tokens=1024)))
    assert [s.layers for s in plan.stages] == [LayerRange(0, 15), LayerRange(15, 30)]
    assert [s.engine.threads for s in plan.stages] == [4, 2]  # 0 = the device's cores
    assert all(s.engine.context_tokens == 1024 for s in plan.stages)
    assert plan.codec == "q8_0" and plan.stages[1].worker == "10.0.0.2:50151"
    text = "\n".join(plan.describe())
    assert "layers [0, 15) on 10.0.0.1:50151 (pi1)" in text and "MiB" in text
    assert make_plan(facts, [device(1, cores=4), device(2, cores=2)],
                     PlanOptions(codec="q8_0", engine=EngineConfig(context_tokens=1024))) == plan


def test_a_stage_over_its_budget_is_refused_with_numbers(facts):
    with pytest.raises(PlanError, match=r"stage 1 \(layers \[15, 30\)\) on 10\.0\.0\.2:50151 "
                                        r"needs \d+ MiB.*budget is 100 MiB.*--context"):
        make_plan(facts, [device(1), device(2, budget=100 * MIB)])


def test_workers_on_one_host_share_its_ram(facts):
    small_host = 400 * MIB  # each stage fits its own budget, the two do not fit together
    devices = [device(1, host="same", available=small_host),
               device(2, host="same", available=small_host)]
    with pytest.raises(PlanError, match=r"share one machine .* need \d+ MiB together"):
        make_plan(facts, devices)
    make_plan(facts, [device(1, host="same"), device(2, host="same")])  # 8 GiB: fits


def test_bad_device_lists_are_refused(facts):
    with pytest.raises(PlanError, match="no workers"):
        make_plan(facts, [])
    with pytest.raises(PlanError, match="at least one layer"):
        make_plan(facts, [device(i) for i in range(31)])
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


def test_worker_lists_keep_order():
    assert parse_workers(" pi1:50151, [::1]:7 ") == ("pi1:50151", "[::1]:7")
