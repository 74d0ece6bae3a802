"""The capability probe: a worker times a few layers shaped like the model's, once per
shape, and the planner gives a faster worker more layers."""

from __future__ import annotations

from orchcore.facts import read_model_facts
from orchcore.probe import layer_shape
from orchestrator.pipeline.connected import Cluster
from orchestrator.planning.plan import PlanOptions, make_plan
from orchestrator.settings import OrchSettings
from testkit.cluster import worker_server


def test_probe_times_the_model_shape_once_and_feeds_the_planner(smollm2_path, tmp_path):
    facts = read_model_facts(smollm2_path)
    shape = layer_shape(facts)
    assert shape.n_embd == 576 and shape.n_ff == 1536 and shape.layer_bytes > 0
    settings = OrchSettings.load(context_tokens=512)
    with worker_server(tmp_path / "a") as a, worker_server(tmp_path / "b") as b:
        cluster = Cluster.connect([a, b], None, settings)
        try:
            first = cluster.clients[0].probe(shape)
            again = cluster.clients[0].probe(shape)
            assert not first.cached and again.cached
            assert again.decode_s_per_layer == first.decode_s_per_layer
            # a whole 30-layer decode step of a 135M model takes milliseconds, not seconds
            assert 1e-5 < first.decode_s_per_layer * facts.n_layers < 0.5
            assert first.prefill_s_per_token_per_layer < first.decode_s_per_layer
            cluster.measure_speeds(facts)
            assert all(d.decode_s_per_layer and d.decode_s_per_layer > 0
                       for d in cluster.devices)
            plan = make_plan(facts, cluster.devices, PlanOptions(objective="throughput"))
            assert plan.predicted_decode_s is not None and plan.predicted_decode_s > 0
            assert plan.predicted_prompt_tokens_s > 1 / plan.predicted_decode_s  # batching
            assert "ms/token" in "\n".join(plan.describe())
            assert "prompts at" in "\n".join(plan.describe())
        finally:
            cluster.close()
    assert not list((tmp_path / "a" / "cache").glob(".probe-*"))  # the probe model is gone
