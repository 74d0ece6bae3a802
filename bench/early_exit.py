"""Early exit: how often the drafts of a model's own first K layers (an exit shard: layers
[0, K) with the model's final norm and head) are kept by the whole model, in process.

    python bench/early_exit.py --tokens 64 --early 0.25,0.5,0.75,0.9,1

Models: the real SmolLM2-135M requantized to Q4_0 (as ``bench/speculation.py`` does) and as
shipped (Q4_1), and Gemma 3 270M (Q4_K_M). Tasks: those of ``bench/speculation.py`` (copy
with an edit, free chat, code), chat-templated. Per model and K (``--early``: fractions of
the model's layers), greedy decoding with the exit shard drafting k = 2 and 4 tokens a pass
(``open_early_exit``): acceptance per token (kept / (kept + rejections)), tokens per pass,
and whether the answer equals plain decoding. Then what drafting costs, one thread pinned to
one core (the last of the process's; start it under ``taskset -c N`` to choose): the
weights a token reads in the exit shard over the whole model's (its layers and the lm
head), one token's forward in the exit shard over one in the whole model (medians of
alternating pairs), the target's batch costs c(k+1), and the cost model's speedup
E(a, k) / (c(k+1) + k * draft) for the three tasks' acceptance together
(``cost.predicted_speedup``). Acceptance does not depend on the machine's load; the
times do.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from _common import console, median, print_header
from rich.table import Table
from speculation import TASKS, batch_costs, requantized

from orchcore.engine import EngineConfig, StageEngine
from orchcore.facts import OUTPUT, TOKEN_EMBD, ModelFacts, read_model_facts
from orchcore.speculation.cost import PassCosts, predicted_speedup
from orchcore.speculation.decode import DecodeStats, EngineTarget, decode
from orchcore.speculation.drafters import DraftModel, open_early_exit
from orchestrator.models.store import resolve_model
from orchestrator.text.tokenizer import Tokenizer

DRAFT_LENGTHS = (2, 4)
CONFIG = EngineConfig(threads=1, context_tokens=512, max_sessions=2, batch_tokens=128)
COST_PROMPT = list(range(100, 164))  # as bench/speculation.py's batch costs


@dataclass
class ExitRow:
    k_exit: int
    shard_bytes: int
    weights: float  # weights one token reads in the exit shard, over the whole model's
    draft: float  # one token's forward in the exit shard, over one in the whole model
    per_task: dict[tuple[str, int], tuple[DecodeStats, bool]]  # (task, k) -> stats, same
    pooled: dict[int, DecodeStats]  # k -> the three tasks' stats together


def pooled(stats: Sequence[DecodeStats]) -> DecodeStats:
    return DecodeStats(**{f.name: sum(getattr(s, f.name) for s in stats)
                          for f in fields(DecodeStats)})


def weights_read(facts: ModelFacts, k_exit: int) -> float:
    """Bytes of weights one token's forward reads in the exit shard, over the whole
    model's: its layers and the lm head (an embedding lookup reads one row)."""
    head = facts.by_name.get(OUTPUT) or facts.by_name[TOKEN_EMBD]
    return (sum(facts.layer_bytes[:k_exit]) + head.n_bytes) / \
        (sum(facts.layer_bytes) + head.n_bytes)


def step_ratio(target: StageEngine, exit_engine: StageEngine, repeats: int = 15) -> float:
    """One token's forward in ``exit_engine`` over one in ``target``, after the same
    64-token prompt: medians of ``repeats`` alternating pairs (so both see the same load)."""
    n = len(COST_PROMPT)
    engines = (target, exit_engine)
    for engine in engines:
        engine.forward("cost", range(n), tokens=COST_PROMPT)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for engine, spent in zip(engines, times, strict=True):
            started = time.perf_counter()
            engine.forward("cost", [n], tokens=[COST_PROMPT[-1]])
            spent.append(time.perf_counter() - started)
            engine.rollback("cost", n)
    for engine in engines:
        engine.end_session("cost")
    return median(times[1]) / median(times[0])


def greedy(engine: StageEngine, prompt: list[int], args: argparse.Namespace, stop: set[int],
           drafter: DraftModel | None = None, k: int = 0) -> tuple[list[int], DecodeStats]:
    target = EngineTarget(engine, "target")
    out, st = decode(target, prompt, args.tokens, drafter=drafter, k=k, stop=stop)
    target.rollback(0)
    return out, st


def model_main(out, label: str, model: Path, template: str | None, args: argparse.Namespace,
               tmp: Path) -> None:
    facts = read_model_facts(model)
    n_layers = facts.n_layers
    ks = sorted({min(n_layers - 1, max(1, round(f * n_layers))) for f in args.early})
    with Tokenizer.from_gguf(model) as tok:
        prompts = {t: tok.encode_chat([{"role": "user", "content": m}], template=template)
                   for t, m in TASKS.items()}
        stop = set(tok.end_of_generation)
    rows = []
    with StageEngine(model, CONFIG) as engine:
        costs = batch_costs(EngineTarget(engine, "cost"), [k + 1 for k in DRAFT_LENGTHS])
        engine.end_session("cost")
        plain = {t: greedy(engine, p, args, stop)[0] for t, p in prompts.items()}
        for k_exit in ks:
            dest = tmp / f"{model.stem}.exit-{k_exit}.gguf"
            drafter = open_early_exit(model, k_exit, dest, CONFIG)
            try:
                draft = step_ratio(engine, drafter.engine)
                per_task = {}
                for task, prompt in prompts.items():
                    for k in DRAFT_LENGTHS:
                        got, st = greedy(engine, prompt, args, stop, drafter, k)
                        per_task[task, k] = (st, got == plain[task])
                rows.append(ExitRow(k_exit, dest.stat().st_size, weights_read(facts, k_exit),
                                    draft, per_task,
                                    {k: pooled([per_task[t, k][0] for t in prompts])
                                     for k in DRAFT_LENGTHS}))
            finally:
                drafter.close()
                dest.unlink(missing_ok=True)
    report(out, label, n_layers, list(prompts), rows, costs)


def report(out, label: str, n_layers: int, tasks: list[str], rows: list[ExitRow],
           costs: dict[int, float]) -> None:
    table = Table(title=f"{label}: {n_layers} layers; drafts kept by the whole model (greedy)")
    table.add_column("K", justify="right")
    table.add_column("task")
    for k in DRAFT_LENGTHS:
        for col in (f"k={k} kept/drafted", "a", "tokens/pass"):
            table.add_column(col, justify="right")
    table.add_column("same tokens", justify="right")
    for row in rows:
        for task in [*tasks, "all three"]:
            cells, same = [], True
            for k in DRAFT_LENGTHS:
                if task == "all three":
                    st = row.pooled[k]
                    same = same and all(row.per_task[t, k][1] for t in tasks)
                else:
                    st, same_k = row.per_task[task, k]
                    same = same and same_k
                cells += [f"{st.accepted}/{st.drafted}", f"{st.acceptance:.2f}",
                          f"{st.tokens_per_pass:.2f}"]
            table.add_row(f"{row.k_exit}/{n_layers}" if task == tasks[0] else "", task,
                          *cells, "yes" if same else "no", end_section=task == "all three")
    out.print(table)
    table = Table(title=f"{label}: what drafting costs, 1 thread; " + ", ".join(
        f"c({n}) {c:.2f}" for n, c in sorted(costs.items())))
    for col in ("K", "exit shard MiB", "weights read", "draft / step",
                *(f"k={k} predicted x" for k in DRAFT_LENGTHS)):
        table.add_column(col, justify="right")
    for row in rows:
        model = PassCosts(costs, step_ms=1.0, draft_ms=row.draft)
        table.add_row(f"{row.k_exit}/{n_layers}", f"{row.shard_bytes / (1 << 20):.1f}",
                      f"{row.weights:.2f}", f"{row.draft:.2f}",
                      *(f"{predicted_speedup(row.pooled[k].acceptance, k, model):.2f}"
                        for k in DRAFT_LENGTHS))
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
