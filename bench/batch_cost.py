"""What one decode step of several sessions costs a stage, against one session's step.

    python bench/batch_cost.py --models 135m,1b --rounds 3

The first half of the model as a stage engine (1 thread, pinned to one core), holding
``max(--batch)`` sessions with a short prompt each; then, in alternating rounds, decode
steps of 1, 2, 4, ... sessions in one ``llama_decode``. Batching pays as much as a batch
of b costs less than b single steps: the ceiling of what concurrent sessions gain.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from _common import console, get_model, halves, parse_models, print_header, work_directory
from rich.table import Table

from orchcore.engine import EngineConfig, StageEngine, Step

PROMPT = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="135m,1b")
    ap.add_argument("--batch", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per batch and round")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    sizes = [int(x) for x in args.batch.split(",")]
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    out = console()
    print_header(out, "Decode steps of several sessions in one llama_decode")
    with work_directory(args.workdir) as workdir:
        for key in parse_models(args.models):
            model = get_model(key, workdir)
            layers, shard = halves(model.path, workdir)[0]
            times = measure(shard, sizes, args)
            table = Table(title=f"{model.label}: layers {layers}, 1 thread, median ms of "
                                f"{args.rounds} rounds x {args.steps} steps (min-max of "
                                f"round medians)")
            for col in ("sessions", "ms per step", "ms per session", "vs one session"):
                table.add_column(col, justify="right")
            base = np.median(times[1])
            for b in sizes:
                t = np.median(times[b])
                table.add_row(str(b), f"{t:.2f} ({min(times[b]):.2f}-{max(times[b]):.2f})",
                              f"{t / b:.2f}", f"{t / b / base:.2f}")
            out.print(table)


def measure(shard: Path, sizes: list[int], args: argparse.Namespace) -> dict[int, list[float]]:
    most = max(sizes)
    context = PROMPT + args.rounds * args.steps * len(sizes) + 8
    times: dict[int, list[float]] = {b: [] for b in sizes}
    with StageEngine(shard, EngineConfig(threads=1, context_tokens=context, max_sessions=most,
                                         batch_tokens=max(PROMPT, most))) as engine:
        for s in range(most):
            engine.forward(f"s{s}", range(PROMPT), tokens=list(range(100, 100 + PROMPT)))
        for r in range(args.rounds):
            for b in sizes if r % 2 == 0 else reversed(sizes):
                steps = []
                for i in range(args.steps):
                    batch = [Step(f"s{s}", np.array([engine.session_length(f"s{s}")],
                                                    np.int32)) for s in range(b)]
                    started = time.perf_counter()
                    engine.forward_batch(batch, tokens=[200 + i] * b)
                    steps.append(time.perf_counter() - started)
                times[b].append(float(np.median(steps)) * 1e3)
    return times


if __name__ == "__main__":
    main()
