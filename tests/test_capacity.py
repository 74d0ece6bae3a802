"""Capacity: a model bigger than any one worker runs exactly across workers whose unequal
budgets the planner sizes the layer ranges to; every worker's peak RSS stays in budget."""

from __future__ import annotations

import numpy as np
import pytest

from orchcore import modelgen
from orchcore.facts import read_model_facts
from orchcore.memory import MIB, StageMemory
from orchcore.shard import even_ranges
from orchestrator.cluster.local import LocalCluster
from orchestrator.pipeline.connected import Cluster
from orchestrator.pipeline.verify import LocalChain
from orchestrator.planning.plan import make_plan
from orchestrator.settings import OrchSettings
from orchestrator.text.tokenizer import Tokenizer
from testkit.chain import replay
from testkit.cluster import greedy_tokens
from testkit.models import generated_model
from testkit.reference import ReferenceModel

# In this order an even cut overflows the first worker; 165 MiB holds no layer at all.
BUDGETS_MB = [260, 310, 300, 165, 310, 305, 300, 295]
PROMPT = [1 + (i * 37) % 31000 for i in range(40)]


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status
                    if line.startswith("VmHWM:"))


@pytest.mark.slow
def test_a_model_larger_than_any_worker_runs_exactly(tmp_path):
    model = generated_model(modelgen.preset("bench-1b-q4_0"), "1b.gguf")
    facts = read_model_facts(model)
    assert facts.file_size / MIB >= 1.8 * max(BUDGETS_MB)
    settings = OrchSettings.load(context_tokens=512, max_sessions=1, batch_tokens=64,
                                 threads=1)
    memory = StageMemory(facts, settings.engine())
    first_even = even_ranges(facts.n_layers, len(BUDGETS_MB))[0]
    assert memory(first_even.start, first_even.end).total > BUDGETS_MB[0] * MIB

    ref = ReferenceModel(model, threads=1)
    want, want_logits = ref.greedy(PROMPT, 6)
    ref.close()
    with LocalCluster(len(BUDGETS_MB), tmp_path / "w", threads_per_worker=1,
                      memory_budgets_mb=BUDGETS_MB) as local:
        cluster = Cluster.connect(local.addresses, local.token, settings, local.check_alive)
        try:
            plan = make_plan(facts, cluster.devices, settings.plan_options())
            print("\n".join(plan.describe()))
            small = local.addresses[BUDGETS_MB.index(165)]
            reasons = {o.device.address: o.reason for o in plan.left_out}
            assert "too small for one layer" in reasons[small]
            assert len(plan.stages) >= 5  # no worker could hold more than 3 of 16 layers
            for stage in plan.stages:  # each stage's estimate fits its worker's budget
                assert stage.memory.total <= stage.budget, stage
            with Tokenizer.from_gguf(model) as tokenizer, \
                    cluster.open(plan, facts, tokenizer) as running:
                assert greedy_tokens(running, PROMPT, 6) == want
            for stage in plan.stages:
                proc = local.procs[local.addresses.index(stage.worker)]
                assert _peak_rss(proc.pid) <= stage.budget, stage
        finally:
            cluster.close()
    # The same cut in one process: f32 logits equal the unsplit model's, bit for bit.
    chain = LocalChain(model, [s.layers for s in plan.stages], tmp_path, settings.engine())
    try:
        got = replay(chain, PROMPT, want)
    finally:
        chain.close()
    assert all(np.array_equal(a, b) for a, b in zip(got, want_logits, strict=True))
