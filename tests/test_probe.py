"""The capability probe: a worker times a few layers shaped like the model's, once per
shape, and the planner gives a faster worker more layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from orchcore import modelgen
from orchcore.facts import read_model_facts
from orchcore.memory import PROCESS_BASELINE_BYTES
from orchcore.probe import layer_shape
from orchestrator.cluster.local import LocalCluster
from orchestrator.pipeline.connected import Cluster
from orchestrator.planning.plan import PlanOptions, make_plan
from orchestrator.settings import OrchSettings
from testkit.cluster import worker_server
from worker import baseline


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


# Layers of a 1B model's width (2048, feed-forward 4096, Q4_0): about 20 MiB each, so the
# four probe layers take 80 MiB. The model itself has two: 41 MB.
WIDE = modelgen.ModelSpec(n_layers=2, n_embd=2048, n_head=32, n_head_kv=8, n_ff=4096,
                          n_vocab=512, weight_type=modelgen.GType.Q4_0, random_blocks=True)


def test_a_worker_too_small_for_the_probe_is_left_out_not_fatal(tmp_path):
    """200 MiB leaves 40 MiB beside the worker process for the probe: it times fewer
    layers. 165 MiB cannot hold one probe layer: it stays untimed, and the plan leaves both
    out with their reason."""
    model = modelgen.write_model(tmp_path / "wide.gguf", WIDE)
    for i in range(3):  # the budgets above are sized for a process of 160 MiB
        baseline.keep(tmp_path / "w" / f"worker-{i}", 1, PROCESS_BASELINE_BYTES)
    with LocalCluster(3, tmp_path / "w", threads_per_worker=1,
                      memory_budgets_mb=[200, 165, 700]) as workers:
        env = dict(os.environ, ORCH_TOKEN=workers.token, ORCH_CACHE_DIR=str(tmp_path / "c"))
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "plan", str(model), "--json",
             "--context", "256", "--workers", ",".join(workers.addresses)],
            env=env, capture_output=True, text=True, timeout=180)
    model.unlink()
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert [s["worker"] for s in plan["stages"]] == [workers.addresses[2]]
    reasons = {s["worker"]: s["reason"] for s in plan["standby"]}
    small, tiny = workers.addresses[:2]
    assert reasons.keys() == {small, tiny}, reasons
    assert all("too small for one layer" in r for r in reasons.values()), reasons
    notes = done.stderr.replace("\n", " ")
    assert f"not timed: worker {tiny}: too small to time this model" in notes, notes
    assert f"worker {small}" not in notes, notes
    assert (tmp_path / "w" / "worker-0" / "probe.json").exists()  # timed on fewer layers
