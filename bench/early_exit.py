"""Early exit: how often the drafts of a model's own first K layers (an exit shard: layers
[0, K) with the model's final norm and head) are kept by the whole model, in process.

    python bench/early_exit.py --tokens 64 --early 0.25,0.5,0.75,0.9,1

Models: the real SmolLM2-135M requantized to Q4_0 (as ``bench/speculation.py`` does) and as
shipped (Q4_1), and Gemma 3 270M (Q4_K_M). Tasks: those of ``bench/speculation.py`` (copy
with an edit, free chat, code), chat-templated. Per model and K (``--early``: fractions of
the model's layers), greedy decoding with the exit shard drafting k = 2 and 4 tokens a pass
(``open_early_exit``): acceptance per token (kept / (kept + rejections)), tokens per pass,
and whether the answer equals plain decoding. Then the costs, one thread pinned to one core
(the last of the process's; start it under ``taskset -c N`` to choose):
the drafter's time per drafted token (its proposals, catch-up included) over the target's
time per plain step, the target's batch costs c(k+1), the cost model's speedup
E(a, k) / (c(k+1) + k * draft) for the pooled acceptance (``cost.predicted_speedup``),
and the measured speedup of the same decodes. Acceptance does not depend on the machine's
load; the times do.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _common import console, print_header
from rich.table import Table
from speculation import TASKS, batch_costs, requantized

from orchcore.engine import EngineConfig, StageEngine
from orchcore.facts import read_model_facts
from orchcore.speculation.cost import PassCosts, predicted_speedup
from orchcore.speculation.decode import DecodeStats, EngineTarget, decode
from orchcore.speculation.drafters import Draft, DraftModel, open_early_exit
from orchestrator.models.store import resolve_model
from orchestrator.text.tokenizer import Tokenizer

DRAFT_LENGTHS = (2, 4)
CONFIG = EngineConfig(threads=1, context_tokens=512, max_sessions=2, batch_tokens=128)


class TimedDrafter:
    """A drafter that keeps the time its proposals took and the tokens they held."""

    def __init__(self, drafter: DraftModel) -> None:
        self.drafter, self.seconds, self.tokens = drafter, 0.0, 0

    def propose(self, context: Sequence[int], k: int) -> Draft:
        started = time.perf_counter()
        draft = self.drafter.propose(context, k)
        self.seconds += time.perf_counter() - started
        self.tokens += len(draft.tokens)
        return draft


class TimedTarget(EngineTarget):
    """The target, keeping the time its prompt took (forwards without every row's logits),
    so that the decode's time can be counted without it."""

    prefill_s = 0.0

    def forward(self, start: int, tokens: Sequence[int], all_rows: bool) -> np.ndarray:
        started = time.perf_counter()
        logits = super().forward(start, tokens, all_rows)
        if not all_rows:
            self.prefill_s += time.perf_counter() - started
        return logits


@dataclass
class Pooled:
    """Several decodes' counts and times together."""

    stats: DecodeStats = field(default_factory=DecodeStats)
    seconds: float = 0.0

    def add(self, st: DecodeStats, seconds: float) -> None:
        for name in ("tokens", "passes", "drafted", "accepted", "rejections",
                     "drafting_passes"):
            setattr(self.stats, name, getattr(self.stats, name) + getattr(st, name))
        self.seconds += seconds


def timed_decode(engine: StageEngine, prompt: list[int], args: argparse.Namespace,
                 stop: set[int], drafter: TimedDrafter | None = None, k: int = 0
                 ) -> tuple[list[int], DecodeStats, float]:
    """The answer, its counts, and the seconds it took after the prompt."""
    target = TimedTarget(engine, "target")
    started = time.perf_counter()
    out, st = decode(target, prompt, args.tokens, drafter=drafter, k=k, stop=stop)
    seconds = time.perf_counter() - started - target.prefill_s
    target.rollback(0)
    return out, st, seconds


def model_main(out, label: str, model: Path, template: str | None, args: argparse.Namespace,
               tmp: Path) -> None:
    n_layers = read_model_facts(model).n_layers
    ks = sorted({min(n_layers - 1, max(1, round(f * n_layers))) for f in args.early})
    with Tokenizer.from_gguf(model) as tok:
        prompts = {t: tok.encode_chat([{"role": "user", "content": m}], template=template)
                   for t, m in TASKS.items()}
        stop = set(tok.end_of_generation)
    with StageEngine(model, CONFIG) as engine:
        costs = batch_costs(EngineTarget(engine, "cost"), [k + 1 for k in DRAFT_LENGTHS])
        plain = {t: timed_decode(engine, p, args, stop) for t, p in prompts.items()}
        plain_all = Pooled()
        for _, st, s in plain.values():
            plain_all.add(st, s)
        step_s = plain_all.seconds / plain_all.stats.passes
        rows = []
        for k_exit in ks:
            dest = tmp / f"{model.stem}.exit-{k_exit}.gguf"
            drafter = TimedDrafter(open_early_exit(model, k_exit, dest, CONFIG))
            try:
                per_task = {}
                pooled = {k: Pooled() for k in DRAFT_LENGTHS}
                for task, prompt in prompts.items():
                    for k in DRAFT_LENGTHS:
                        got, st, s = timed_decode(engine, prompt, args, stop, drafter, k)
                        per_task[task, k] = (st, got == plain[task][0])
                        pooled[k].add(st, s)
                rows.append((k_exit, dest.stat().st_size, per_task, pooled,
                             drafter.seconds / max(drafter.tokens, 1) / step_s))
            finally:
                drafter.drafter.close()
                dest.unlink(missing_ok=True)
    report(out, label, n_layers, list(prompts), rows, costs, plain_all)


def report(out, label: str, n_layers: int, tasks: list[str], rows: list, costs: dict,
           plain: Pooled) -> None:
    table = Table(title=f"{label}: {n_layers} layers; drafts kept by the whole model (greedy)")
    table.add_column("K", justify="right")
    table.add_column("task")
    for k in DRAFT_LENGTHS:
        for col in (f"k={k} kept/drafted", "a", "tokens/pass"):
            table.add_column(col, justify="right")
    table.add_column("same tokens", justify="right")
    for k_exit, _, per_task, pooled, _ in rows:
        for task in [*tasks, "all three"]:
            cells, same = [], True
            for k in DRAFT_LENGTHS:
                if task == "all three":
                    st = pooled[k].stats
                    same = same and all(per_task[t, k][1] for t in tasks)
                else:
                    st, same_k = per_task[task, k]
                    same = same and same_k
                cells += [f"{st.accepted}/{st.drafted}", f"{st.acceptance:.2f}",
                          f"{st.tokens_per_pass:.2f}"]
            table.add_row(f"{k_exit}/{n_layers}" if task == tasks[0] else "", task, *cells,
                          "yes" if same else "no", end_section=task == "all three")
    out.print(table)
    pc = PassCosts(costs)
    table = Table(title=f"{label}: costs, 1 thread (busy machine); target step "
                        f"{plain.seconds / plain.stats.passes * 1e3:.1f} ms; " + ", ".join(
                            f"c({n}) {c:.2f}" for n, c in sorted(costs.items())))
    for col in ("K", "exit shard MiB", "draft / step"):
        table.add_column(col, justify="right")
    for k in DRAFT_LENGTHS:
        table.add_column(f"k={k} predicted x", justify="right")
        table.add_column("measured x", justify="right")
    plain_rate = plain.stats.tokens / plain.seconds
    for k_exit, size, _, pooled, draft in rows:
        cells = []
        for k in DRAFT_LENGTHS:
            model = PassCosts(pc.batch_cost, step_ms=1.0, draft_ms=draft)
            st = pooled[k].stats
            cells += [f"{predicted_speedup(st.acceptance, k, model):.2f}",
                      f"{st.tokens / pooled[k].seconds / plain_rate:.2f}"]
        table.add_row(f"{k_exit}/{n_layers}", f"{size / (1 << 20):.1f}", f"{draft:.2f}",
                      *cells)
    out.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--early", default="0.25,0.5,0.75,0.9,1",
                    help="K as fractions of the model's layers, comma-separated (rounded, "
                         "and at most one layer below the model's: 1 is the deepest exit)")
    ap.add_argument("--models", default="135m-q4_0,135m,gemma3",
                    help="of 135m-q4_0 (requantized), 135m (shipped Q4_1), gemma3")
    args = ap.parse_args()
    args.early = [float(f) for f in args.early.split(",")]
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    out = console()
    print_header(out, "Early exit: how often its drafts are kept (in process)")
    shipped = resolve_model("smollm2-135m", progress=False)
    # label, the model, and a chat template where the file has none (llama.cpp's name)
    models = {"135m-q4_0": ("SmolLM2-135M requantized to Q4_0", lambda: requantized(shipped),
                            None),
              "135m": ("SmolLM2-135M Q4_1 (shipped)", lambda: shipped, None),
              "gemma3": ("Gemma 3 270M Q4_K_M",
                         lambda: resolve_model("gemma3-270m", progress=False), "gemma")}
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        for key in args.models.split(","):
            label, path, template = models[key]
            model_main(out, label, path(), template, args, Path(tmp))


if __name__ == "__main__":
    main()
