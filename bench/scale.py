"""Full-size models over workers smaller than the model: what the first, second and third
identical run cost and move.

    python bench/scale.py --quick                       # a small preset, end to end
    python bench/scale.py                               # qwen3moe-30b-a3b, then qwen3-8b

Each model is generated (``orchcore.modelgen`` preset, random weights), then run three
times over 3 local workers (1 thread each, each pinned to a core, a memory budget each
below the model's size). Each run connects, times the workers (probe, refined by the
earlier runs: ``SpeedBook``), plans with the cut the workers hold (``PlanBook``),
deploys, answers, and files what it measured. Reported per run: the time to the first
answer token, the shard bytes sent, the plan's choice, disk used by the orchestrator and
each worker, each worker's VmHWM against its stage's estimate, decode tokens/s against
predicted, and each stage's compute per decoded token against the plan's prediction. The
targets: the second and third run send 0 bytes and keep the cut; each stage's predicted
time within 15% of its measured time. The model is deployed as ``orch run`` deploys it
(no rows kept for prompt logprobs).

Needs about three times the model's size free on disk (the model, the orchestrator's
shards, the workers' caches); everything generated is deleted after each model.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from _common import console, print_header, prompt_tokens, work_directory
from rich.table import Table

from orchcore import modelgen
from orchcore.facts import read_model_facts
from orchcore.memory import MIB, StageMemory
from orchcore.probe import layer_shape
from orchestrator.cluster.local import LocalCluster
from orchestrator.pipeline.connected import Cluster
from orchestrator.pipeline.session import GenerationStats
from orchestrator.planning.plan import make_plan
from orchestrator.planning.speeds import SpeedBook
from orchestrator.planning.sticky import PlanBook
from orchestrator.settings import OrchSettings
from orchestrator.text.tokenizer import Tokenizer
from testkit.cluster import GREEDY

WORKERS = 3
GB = 1e9
STAGE_TIME_TOLERANCE = 0.15  # each stage's predicted time per token against its measured


def orchestrator_bytes(work: Path, model: Path) -> int:
    """What the orchestrator keeps beside the model: everything in ``work`` but the model
    and the workers' folders."""
    return sum(p.stat().st_blocks * 512 for p in work.rglob("*")
               if p.is_file() and p != model and "workers" not in p.relative_to(work).parts)


def folder_bytes(path: Path) -> int:
    """Bytes a folder takes on disk (sparse holes and all)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file()) \
        if path.exists() else 0


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def budgets_mb(facts, settings: OrchSettings) -> list[int]:
    """A budget each that holds an even third of the model with 12% to spare: well below
    the model's size, so no worker could hold it."""
    memory, n = StageMemory(facts, settings.engine()), facts.n_layers
    bounds = [round(i * n / WORKERS) for i in range(WORKERS + 1)]
    need = max(memory(a, b).total for a, b in itertools.pairwise(bounds))
    return [int(need * 1.12 / MIB)] * WORKERS


def one_run(local: LocalCluster, facts, settings: OrchSettings, work: Path, args) -> dict:
    """Connect, time, plan (keeping the cut the workers hold), deploy, answer, refine."""
    started = time.perf_counter()
    cluster = Cluster.connect(local.addresses, local.token, settings, local.check_alive)
    try:
        shape = layer_shape(facts).key
        speeds = SpeedBook(work / "speeds.json")
        cluster.measure_speeds(facts)
        # What the planner's own book learned from earlier runs, per device kind.
        cluster.devices = [replace(d, decode_s_per_layer=speeds.speed(d, shape)
                                   or d.decode_s_per_layer) for d in cluster.devices]
        options = settings.plan_options(use_all=True)
        plans = PlanBook(work / "plans.json")
        plan = make_plan(facts, cluster.devices,
                         replace(options, prefer=plans.last(facts, cluster.devices, options)))
        plans.keep(facts, cluster.devices, options, plan)
        stats = GenerationStats()
        with Tokenizer.from_gguf(facts.path) as tokenizer, \
                cluster.open(plan, facts, tokenizer) as model:
            session = model.new_session(GREEDY)
            tokens = model.stream(session, prompt_tokens(32, facts.n_vocab),
                                  args.decode_tokens + 1, stats)
            next(tokens)
            first_s = time.perf_counter() - started
            for _ in tokens:
                pass
            sent = model.deployment.sent_bytes
            peaks = {address: peak_rss(p.pid)
                     for address, p in zip(local.addresses, local.procs, strict=True)}
        speeds.refine(plan, facts, shape, stats.compute_ms, stats.decode_tokens)
    finally:
        cluster.close()
    return {"plan": plan, "first_s": first_s, "sent": sent, "peaks": peaks, "stats": stats}


def stage_times(plan, stats: GenerationStats) -> str:
    """Each stage's compute per decoded token, measured (predicted), in ms; a miss of the
    15% target is marked."""
    cells = []
    for s in plan.stages:
        measured = stats.compute_ms.get(s.index, 0.0) / max(stats.decode_tokens, 1)
        if s.decode_s is None or not measured:
            cells.append(f"{measured:.1f}")
            continue
        off = s.decode_s * 1e3 / measured - 1
        cells.append(f"{measured:.1f} ({s.decode_s * 1e3:.1f}, {off:+.0%}"
                     f"{'' if abs(off) <= STAGE_TIME_TOLERANCE else ' MISS'})")
    return " ".join(cells)


def run_model(out, name: str, work: Path, args) -> None:
    spec = modelgen.preset(name)
    path = work / f"{name}.gguf"
    free = shutil.disk_usage(work).free
    size = sum(t.n_bytes for t in read_model_facts(modelgen.write_model(
        work / "header.gguf", spec, sparse=True)).tensors)
    (work / "header.gguf").unlink()
    if free < 3 * size + 2 * GB:
        out.print(f"[red]{name}: needs about {(3 * size + 2 * GB) / GB:.0f} GB free, "
                  f"{free / GB:.0f} GB here; skipped[/]")
        return
    t = time.perf_counter()
    modelgen.write_model(path, spec)
    out.print(f"{name}: {path.stat().st_size / GB:.2f} GB written in "
              f"{time.perf_counter() - t:.0f} s")
    facts = read_model_facts(path)
    settings = OrchSettings.load(context_tokens=512, max_sessions=1, threads=1,
                                 logprob_rows=1)
    budgets = budgets_mb(facts, settings)
    table = Table(title=f"{name} ({facts.file_size / GB:.2f} GB) over {WORKERS} workers of "
                        f"{budgets[0]} MiB, 1 thread each, context 512")
    for column in ("run", "cut", "first token s", "sent GB", "decode tok/s (pred.)",
                   "stage ms/token (pred.)", "VmHWM / estimate GiB",
                   "disk GB: orch / workers"):
        table.add_column(column)
    try:
        with LocalCluster(WORKERS, work / "workers", threads_per_worker=1,
                          memory_budgets_mb=budgets, pin_cores=True) as local:
            for run in range(1, args.runs + 1):
                r = one_run(local, facts, settings, work, args)
                plan, stats = r["plan"], r["stats"]
                predicted = plan.predicted_decode_s
                decode = stats.decode_tokens / stats.decode_s if stats.decode_s else 0.0
                mem = " ".join(f"{r['peaks'][s.worker] / 2**30:.2f}/"
                               f"{s.memory.total / 2**30:.2f}" for s in plan.stages)
                disks = " ".join(f"{folder_bytes(work / 'workers' / f'worker-{i}') / GB:.2f}"
                                 for i in range(WORKERS))
                table.add_row(str(run), " ".join(str(s.layers) for s in plan.stages),
                              f"{r['first_s']:.1f}", f"{r['sent'] / GB:.2f}",
                              f"{decode:.1f} ({1 / predicted:.1f})" if predicted else
                              f"{decode:.1f}", stage_times(plan, stats), mem,
                              f"{orchestrator_bytes(work, path) / GB:.2f} / {disks}")
                if plan.choice is not None:
                    out.print(f"run {run}: {plan.choice.describe()}", highlight=False)
    finally:
        out.print(table)
        for leftover in (path, work / "workers", work / "speeds.json",
                         work / "plans.json"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the small qwen3moe-30b-a3b-mini preset only, end to end")
    parser.add_argument("--models", default="qwen3moe-30b-a3b,qwen3-8b",
                        help="modelgen presets, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--workdir", help="folder for the generated files (default: a "
                                          "temporary one)")
    args = parser.parse_args()
    out = console()
    print_header(out, "bench/scale.py: full-size models, repeated runs")
    names = ["qwen3moe-30b-a3b-mini"] if args.quick else args.models.split(",")
    with work_directory(args.workdir) as work:
        for name in names:
            run_model(out, name, work, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
