"""The memory estimate against real worker processes: the planner's figure for each stage is
what the worker checked at load, built on the baseline the worker measured itself, and
after one full prompt chunk and 64 decode tokens the process's peak RSS is at or below it,
and at most max(40 MiB, 1%) below (bench/stage_memory.py checks the larger models)."""

from __future__ import annotations

import pytest

from orchcore.memory import MIB
from orchestrator.cluster.local import LocalCluster
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
                       logprob_rows=1) as model_:  # as orch run: no prompt rows scored
        prompt = [1 + (i * 37) % 1000 for i in range(256)]  # one full chunk of plain ids
        greedy_tokens(model_, prompt, DECODE_TOKENS)
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
