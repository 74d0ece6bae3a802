"""The memory estimate against real worker processes: the planner's figure for each stage is
what the worker checked at load, built on the baseline the worker measured itself, and
after one full prompt chunk and 64 decode tokens the process's peak RSS is at or below it,
and at most max(40 MiB, 1%) below (bench/stage_memory.py checks the larger models).

The session speculates over a prompt the model copies, so the last stage verifies chunks
of 17 rows with logits for each, the widest an estimate counts (bench/stage_memory.py
says how the prompt is made)."""

from __future__ import annotations

import pytest

from orchcore.memory import MIB
from orchestrator.cluster.local import LocalCluster
from orchestrator.pipeline.session import GenerationStats
from testkit.cluster import greedy_tokens, open_model

DECODE_TOKENS = 64
TOLERANCE_BYTES = 40 * MIB


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("model", ["smollm2_path", "gemma3_path"])
def test_each_workers_peak_is_its_estimate_within_the_tolerance(model, request, tmp_path):
    path = request.getfixturevalue(model)
    with LocalCluster(2, tmp_path / "w", threads_per_worker=1) as cluster, \
            open_model(path, cluster.addresses, cluster.token, tmp_path,
                       context_tokens=2048, batch_tokens=256, max_sessions=2,
                       logprob_rows=1,  # as orch run: no prompt rows scored
                       speculate="ngram:16") as model_:
        favourite = greedy_tokens(model_, [1], 1)[0]
        block = [1 + (i * 37) % 1000 for i in range(31)]
        block.insert(15, favourite)
        stats = GenerationStats()
        greedy_tokens(model_, block * 8, DECODE_TOKENS, stats)  # one full chunk
        assert stats.speculation.drafted >= 16, "no wide verification chunk"
        pids = dict(zip(cluster.addresses, (p.pid for p in cluster.procs), strict=True))
        for stage, client in zip(model_.plan.stages, model_.path.clients, strict=True):
            info = client.info()
            assert info.baseline_bytes > 0, "the worker measured no baseline"
            assert stage.memory.baseline == info.baseline_bytes, "the plan used another"
            assert info.loaded.resident_bytes == stage.memory.total, \
                "the worker checked another figure than the planner's"
            peak, estimate = _peak_rss(pids[stage.worker]), stage.memory.total
            seen = (f"stage {stage.index}: peak {peak / MIB:.1f} MiB, estimate "
                    f"{stage.memory.describe()}")
            print(seen)
            assert peak <= estimate, seen
            assert estimate - peak <= max(TOLERANCE_BYTES, estimate // 100), seen
