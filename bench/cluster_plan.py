"""The planner against reality: predicted vs measured time per token per stage, with each
worker pinned to a core of its own (1 thread) so the workers act as separate hosts.

    python bench/cluster_plan.py --models 1b,135m --rounds 5

For each model: every worker is timed by its capability probe on the model's layer
shape, the planner cuts the model for throughput (every worker a stage), and the
pipeline decodes ``--decode-tokens`` tokens per round; each stage's measured compute per
token (its ``StageTiming``s) is compared with the plan's prediction. Then the time from
`orch run` to the first token with nothing cached on the workers vs everything cached.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _common import console, get_model, parse_models, print_header, prompt_tokens, work_directory
from rich.table import Table

from orchcore.facts import read_model_facts
from orchestrator.cluster.local import LocalCluster
from orchestrator.pipeline.connected import Cluster
from orchestrator.pipeline.session import GenerationStats
from orchestrator.planning.plan import make_plan
from orchestrator.settings import OrchSettings
from orchestrator.text.tokenizer import Tokenizer
from testkit.cluster import greedy_tokens


def predicted_vs_measured(out, model, workdir, args) -> None:
    facts = read_model_facts(model.path)
    prompt = prompt_tokens(64, facts.n_vocab)
    settings = OrchSettings.load(context_tokens=512, max_sessions=1, threads=1,
                                 objective="throughput")
    with LocalCluster(args.workers, workdir / "pinned", threads_per_worker=1,
                      pin_cores=True) as local:
        cluster = Cluster.connect(local.addresses, local.token, settings, local.check_alive)
        try:
            cluster.measure_speeds(facts)
            plan = make_plan(facts, cluster.devices, settings.plan_options(use_all=True))
            measured: dict[int, list[float]] = {s.index: [] for s in plan.stages}
            with Tokenizer.from_gguf(model.path) as tokenizer, \
                    cluster.open(plan, facts, tokenizer) as running:
                greedy_tokens(running, prompt[:8], 4)  # warm-up
                for _ in range(args.rounds):
                    stats = GenerationStats()
                    greedy_tokens(running, prompt, args.decode_tokens + 1, stats)
                    for index, total in stats.compute_ms.items():
                        measured[index].append(total / stats.decode_tokens)
        finally:
            cluster.close()
    table = Table(title=f"{model.label}: predicted vs measured compute per token "
                        f"({args.workers} workers pinned to one core each, 1 thread, median "
                        f"of {args.rounds} rounds of {args.decode_tokens} tokens)")
    for col in ("stage", "layers", "predicted ms", "measured ms", "spread ms",
                "measured / predicted"):
        table.add_column(col, justify="right")
    for stage in plan.stages:
        got = measured[stage.index]
        median = statistics.median(got)
        predicted = stage.decode_s * 1e3
        table.add_row(str(stage.index), str(stage.layers), f"{predicted:.2f}", f"{median:.2f}",
                      f"{min(got):.2f}-{max(got):.2f}", f"{median / predicted:.2f}")
    out.print(table)


def cold_vs_cached(out, model, workdir) -> None:
    """`orch run` to the first token: a fresh cache (shards written, sent, loaded) vs the
    second run (nothing sent)."""
    env = dict(os.environ, ORCH_CACHE_DIR=str(workdir / "orch-cache"), ORCH_DISCOVERY="off",
               ORCH_WORKER_DISCOVERY="off")
    rows = []
    for label in ("nothing cached", "all cached"):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(model.path),
                               "Hello", "--no-chat", "--max-tokens", "1", "--local", "2"],
                              env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        sent = next((line for line in done.stderr.splitlines() if "shards sent" in line), "")
        rows.append((label, time.perf_counter() - started, sent.strip()))
    table = Table(title=f"{model.label}: `orch run --local 2` to the first token")
    for col in ("run", "seconds", "what was sent"):
        table.add_column(col)
    for label, seconds, sent in rows:
        table.add_row(label, f"{seconds:.1f}", sent)
    out.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="1b,135m")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    out = console()
    print_header(out, "The planner's predictions against measured stage times")
    with work_directory(args.workdir) as workdir:
        for key in parse_models(args.models):
            model = get_model(key, workdir)
            predicted_vs_measured(out, model, workdir / key, args)
            cold_vs_cached(out, model, workdir / key)


if __name__ == "__main__":
    main()
