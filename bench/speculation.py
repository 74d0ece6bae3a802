"""Speculative decoding: plain decode vs prompt-lookup speculation, in process and through
the pipeline.

    python bench/speculation.py --rounds 3 --tokens 96 --k 4
    python bench/speculation.py --pipeline --rounds 3 --tokens 64 --k 4
    python bench/speculation.py --pipeline --generated --rounds 3 --tokens 64 --k 4
    python bench/speculation.py --pipeline --gemma --rounds 3 --tokens 64 --k 4
    python bench/speculation.py --pipeline --shipped --draft q4_0 --rounds 3 --tokens 64

``--pipeline``: two local workers pinned to separate cores, one thread each (as
``bench/throughput.py``), the token ring on; per task the plain pipeline, ``ngram:K`` one
pass at a time (``sync``) and with passes sent ahead (``ahead``), and ``auto``, in
alternating order each round, decode tokens/s from the session's own stats;
beside them the batch-cost ceiling (k+1) / c(k+1) and the cost model's prediction, with
c(n) measured through the same pipeline in the same run (``measure_costs``: the stages'
compute time for a verification chunk of n rows). ``--draft MODEL`` adds
``draft:MODEL`` to the variants (a draft model in this process, the orchestrator, drafting
4 per pass; unpinned, so on a 2-core machine it competes with the workers): MODEL is a
.gguf file, a known model's name, or ``q4_0`` for the 135M requantized to Q4_0 (with
``--shipped``, a real small draft for the shipped Q4_1).

The real SmolLM2-135M requantized to Q4_0 (cached in the test model cache; its batches are
cheap on x86, FINDINGS 11), one thread pinned to one core, as one engine and as a chain of
two engines in this process. Three tasks: copying a paragraph with one edit (input
grounded), free chat, and code. Per task: plain and speculative tokens/s (medians of
alternating rounds), acceptance, tokens per pass, the measured batch-cost ceiling
(k+1) / c(k+1), and the cost model's predicted speedup beside the measured one.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import console, median, print_header
from rich.table import Table

from orchcore import modelgen
from orchcore.engine import EngineConfig, StageEngine
from orchcore.speculation.cost import PassCosts, ahead_pass_ms, expected_tokens
from orchcore.speculation.decode import DecodeStats, EngineTarget, Target, decode
from orchcore.speculation.drafters import PromptLookup
from orchcore.speculation.mode import DEFAULT_K
from orchestrator.cluster.local import LocalCluster
from orchestrator.models.store import resolve_model
from orchestrator.pipeline.session import GenerationStats
from orchestrator.pipeline.speculation import SpeculationStats, measure_costs
from orchestrator.text.tokenizer import Tokenizer
from testkit.chain import Chain, ChainTarget
from testkit.cluster import GREEDY, greedy_tokens, open_model
from testkit.models import fetched_model, generated_model, requantized_model

TASKS = {
    "copy with an edit": "Repeat this paragraph exactly, but write 'evening' instead of "
    "'night': The old lighthouse keeper climbed the stairs every night to light the lamp. "
    "The ships passed safely through the narrow strait, and the village slept without "
    "fear of the rocks below the cliffs.",
    "free chat": "What are three good habits for staying healthy?",
    "code": "Repeat this Python function, renaming total to result:\n\n"
    "def add_all(values):\n    total = 0\n    for value in values:\n        total += value\n"
    "    return total\n",
}


# Token ids for the generated 1B (random weights, no chat template): greedy decoding of
# such weights falls into a short cycle, which prompt lookup then drafts (synthetic).
SYNTHETIC = {"synthetic: a cycle": [1, 17, 300, 42, 99, 17, 300, 42, 5, 17, 300, 42, 99],
             "synthetic: counting": [1, *range(1000, 1040)]}


def batch_costs(target: Target, sizes: list[int], repeats: int = 9) -> dict[int, float]:
    """c(n): one forward of n positions, all rows' logits, in single-row forwards."""
    prompt = list(range(100, 164))
    target.forward(0, prompt, all_rows=False)
    times: dict[int, list[float]] = {n: [] for n in [1, *sizes]}
    for _ in range(repeats):
        for n in times:
            started = time.perf_counter()
            target.forward(len(prompt), list(range(200, 200 + n)), all_rows=True)
            times[n].append(time.perf_counter() - started)
            target.rollback(len(prompt))
    target.rollback(0)
    one = median(times[1])
    return {n: median(t) / one for n, t in times.items() if n > 1}


def measure(make_target: Callable[[str], Target], prompt: list[int], args: argparse.Namespace,
            stop: set[int]) -> dict:
    runs: dict[int, list[float]] = {0: [], args.k: []}
    stats = {}
    outputs = {}
    for r in range(args.rounds):
        for k in (0, args.k) if r % 2 == 0 else (args.k, 0):
            target = make_target("run")
            started = time.perf_counter()
            out, st = decode(target, prompt, args.tokens, drafter=PromptLookup(), k=k,
                             stop=stop)
            runs[k].append(len(out) / (time.perf_counter() - started))
            target.rollback(0)
            stats[k], outputs[k] = st, out
    return {"plain": median(runs[0]), "spec": median(runs[args.k]), "stats": stats[args.k],
            "same": outputs[0] == outputs[args.k], "tokens": len(outputs[args.k])}


def report(out, title: str, rows: list[tuple[str, dict]], costs: dict[int, float],
           k: int) -> None:
    pc = PassCosts(costs)
    table = Table(title=f"{title}; k = {k}; c(n) = " + ", ".join(
        f"c({n}) {c:.2f}" for n, c in sorted(costs.items())))
    for col in ("task", "plain tok/s", "spec tok/s", "measured x", "kept/drafted", "a",
                "tokens/pass", "drafting passes", "ceiling (k+1)/c(k+1)",
                "predicted x", "same tokens"):
        table.add_column(col, justify="right")
    for task, m in rows:
        st = m["stats"]
        table.add_row(task, f"{m['plain']:.1f}", f"{m['spec']:.1f}",
                      f"{m['spec'] / m['plain']:.2f}", f"{st.accepted}/{st.drafted}",
                      f"{st.acceptance:.2f}",
                      f"{st.tokens_per_pass:.2f}", f"{st.drafting_passes}/{st.passes}",
                      f"{pc.ceiling(k):.2f}",
                      f"{predicted(st, k, pc):.2f}",
                      "yes" if m["same"] else "no")
    out.print(table)


def predicted(st: DecodeStats, k: int, costs: PassCosts) -> float:
    """The cost model's speedup for the measured acceptance, with the measured share of
    passes that had drafts (prompt lookup finds nothing to propose at times): those cost
    c(k+1) and yield E(a, k), the others are plain steps."""
    f = st.drafting_passes / st.passes if st.passes else 0.0
    tokens = f * expected_tokens(st.acceptance, k) + (1 - f)
    return tokens / (f * costs.rows_cost(k + 1) + (1 - f))


def pipeline_predicted(spec: SpeculationStats, k: int, costs: PassCosts,
                       stages: int = 0) -> float:
    """``predicted`` for passes through the pipeline: each pass also pays the link. With
    ``stages``, passes were sent ahead: the measured share of them that overlapped the pass
    before took ``ahead_pass_ms`` instead of a whole pass."""
    f = spec.drafting_passes / spec.passes if spec.passes else 0.0
    q = spec.overlapped / spec.passes if spec.passes and stages else 0.0
    tokens = f * expected_tokens(spec.acceptance, k) + (1 - f)
    plain = costs.step_ms + costs.link_ms

    def pass_ms(rows: int) -> float:
        whole = costs.rows_cost(rows) * costs.step_ms + costs.link_ms
        return q * ahead_pass_ms(costs, rows, stages) + (1 - q) * whole if q else whole

    spent = f * pass_ms(k + 1) + (1 - f) * pass_ms(1)
    return tokens * plain / spent


def pipeline_main(args: argparse.Namespace, model: Path, prompts: dict[str, list[int]],
                  draft: Path | None = None) -> None:
    out = console()
    ngram = f"ngram:{args.k}"
    variants = {"off": {"speculate": "off"},  # label -> settings
                "sync": {"speculate": ngram, "speculate_ahead": False},
                "ahead": {"speculate": ngram, "speculate_ahead": True},
                "auto": {"speculate": "auto"},
                **({f"draft:{draft}": {"speculate": f"draft:{draft}"}} if draft else {})}
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp, \
            LocalCluster(2, Path(tmp) / "workers", threads_per_worker=1,
                         pin_cores=True) as cluster:
        rate: dict[tuple[str, str], list[float]] = {}
        spec: dict[tuple[str, str], SpeculationStats] = {}
        same: dict[tuple[str, str], bool] = {}  # (task, variant): the plain answer's tokens
        costs: list[PassCosts] = []
        for r in range(args.rounds):
            for task, prompt in prompts.items():
                order = list(variants) if r % 2 == 0 else list(variants)[::-1]
                answers = {}
                for variant in order:
                    with open_model(model, cluster.addresses, cluster.token, Path(tmp),
                                    context_tokens=1024, batch_tokens=128,
                                    **variants[variant]) as running:
                        if variant == "off" and task == next(iter(prompts)):
                            costs.append(measure_costs(running.path, f"costs-{r}",
                                                       prompt[:32], 128, GREEDY))
                        stats = GenerationStats()
                        answers[variant] = greedy_tokens(running, prompt, args.tokens, stats)
                        rate.setdefault((task, variant), []).append(
                            stats.decode_tokens / stats.decode_s)
                        spec[task, variant] = stats.speculation
                for variant in list(variants)[1:]:
                    same[task, variant] = answers["off"] == answers[variant]
                out.print(f"round {r + 1} {task}: " + ", ".join(
                    f"{v.split(':')[0] if v.startswith('draft:') else v} "
                    f"{rate[task, v][-1]:.1f} tok/s" for v in variants))
    cost = PassCosts({n: median([c.batch_cost[n] for c in costs]) for n in costs[0].batch_cost},
                     step_ms=median([c.step_ms for c in costs]),
                     link_ms=median([c.link_ms for c in costs]))
    table = Table(title=f"{model.name} over 2 pinned workers x 1 thread, token ring on; "
                        f"{ngram}; step {cost.step_ms:.1f} ms, link {cost.link_ms:.1f} "
                        f"ms; " + ", ".join(f"c({n}) {c:.2f}"
                                            for n, c in sorted(cost.batch_cost.items())))
    for col in ("task", "plain tok/s", "sync tok/s", "x", "ahead tok/s", "x", "auto tok/s",
                "x", "kept/drafted", "a", "tokens/pass", "overlapped", "ceiling sync",
                "predicted sync x", "predicted ahead x", "same tokens"):
        table.add_column(col, justify="right")
    for task in prompts:
        plain = median(rate[task, "off"])
        sync, ahead = median(rate[task, "sync"]), median(rate[task, "ahead"])
        auto = median(rate[task, "auto"])
        st, sa = spec[task, "sync"], spec[task, "ahead"]
        table.add_row(task, f"{plain:.1f}", f"{sync:.1f}", f"{sync / plain:.2f}",
                      f"{ahead:.1f}", f"{ahead / plain:.2f}", f"{auto:.1f}",
                      f"{auto / plain:.2f}", f"{st.accepted}/{st.drafted}",
                      f"{st.acceptance:.2f}", f"{st.tokens_per_pass:.2f}",
                      f"{sa.overlapped}/{sa.passes}", f"{cost.ceiling(args.k):.2f}",
                      f"{pipeline_predicted(st, args.k, cost):.2f}",
                      f"{pipeline_predicted(sa, args.k, cost, stages=2):.2f}",
                      "yes" if same[task, "sync"] and same[task, "ahead"] else "no")
    out.print(table)
    if draft:
        draft_table(out, model, draft, prompts, rate, spec, same)


def draft_table(out, model: Path, draft: Path, prompts: dict[str, list[int]],
                rate: dict[tuple[str, str], list[float]],
                spec: dict[tuple[str, str], SpeculationStats],
                same: dict[tuple[str, str], bool]) -> None:
    """The draft model's row per task, beside plain decoding of the same rounds."""
    variant = f"draft:{draft}"
    table = Table(title=f"{model.name} drafted by {draft.name} in the orchestrator's process "
                        f"({DEFAULT_K} per pass, ring off for drafting sessions)")
    for col in ("task", "plain tok/s", "draft tok/s", "x", "kept/drafted", "a",
                "tokens/pass", "drafting ms/pass", "same tokens"):
        table.add_column(col, justify="right")
    for task in prompts:
        plain, drafted = median(rate[task, "off"]), median(rate[task, variant])
        st = spec[task, variant]
        table.add_row(task, f"{plain:.1f}", f"{drafted:.1f}", f"{drafted / plain:.2f}",
                      f"{st.accepted}/{st.drafted}", f"{st.acceptance:.2f}",
                      f"{st.tokens_per_pass:.2f}",
                      f"{st.draft_s / max(1, st.drafting_passes) * 1e3:.1f}",
                      "yes" if same[task, variant] else "no")
    out.print(table)


def draft_model(name: str, shipped: Path) -> Path:
    """``--draft``: ``q4_0`` (the 135M requantized), else a file or a known model."""
    return requantized_model(shipped) if name == "q4_0" else resolve_model(name, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--pipeline", action="store_true",
                    help="through two pinned local workers instead of in process")
    ap.add_argument("--shipped", action="store_true",
                    help="the model as shipped (Q4_1), not requantized to Q4_0")
    ap.add_argument("--draft", metavar="MODEL",
                    help="with --pipeline, also draft:MODEL (a .gguf file, a known model, or "
                         "q4_0: the 135M requantized; pair it with --shipped)")
    ap.add_argument("--gemma", action="store_true",
                    help="with --pipeline: Gemma 3 270M (Q4_K_M, as published) instead of the "
                         "135M")
    ap.add_argument("--generated", action="store_true",
                    help="with --pipeline: the generated 1B-shaped Q4_0 (random weights) on a "
                         "synthetic prompt it repeats, instead of the 135M")
    args = ap.parse_args()
    if args.pipeline and args.generated:
        print_header(console(), "Speculative decoding through the pipeline, generated 1B "
                                "(synthetic: random weights on a prompt they repeat)")
        model = generated_model(modelgen.preset("bench-1b-q4_0"), "1b.gguf")
        pipeline_main(args, model, SYNTHETIC)
        return
    if args.draft and not args.pipeline:
        ap.error("--draft runs through the pipeline: add --pipeline")
    if args.pipeline:
        print_header(console(), "Speculative decoding through the pipeline (prompt lookup"
                     + (", a draft model)" if args.draft else ")"))
        shipped = resolve_model("smollm2-135m", progress=False)
        model = shipped if args.shipped else requantized_model(shipped)
        template = None
        if args.gemma:  # its file has no chat template: llama.cpp's own "gemma" one
            model, template = fetched_model("gemma3-270m"), "gemma"
        with Tokenizer.from_gguf(model) as tok:
            prompts = {t: tok.encode_chat([{"role": "user", "content": m}], template=template)
                       for t, m in TASKS.items()}
        pipeline_main(args, model, prompts,
                      draft_model(args.draft, shipped) if args.draft else None)
        return
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    out = console()
    print_header(out, "Speculative decoding in process (prompt lookup)")
    model = requantized_model(resolve_model("smollm2-135m", progress=False))
    tok = Tokenizer.from_gguf(model)
    prompts = {t: tok.encode_chat([{"role": "user", "content": m}]) for t, m in TASKS.items()}
    stop = set(tok.end_of_generation)
    tok.close()
    config = EngineConfig(threads=1, context_tokens=512, max_sessions=2, batch_tokens=128)
    with StageEngine(model, config) as engine:
        costs = batch_costs(EngineTarget(engine, "cost"), [2, 3, 5, 9, 17])
        rows = [(t, measure(lambda s: EngineTarget(engine, s), p, args, stop))
                for t, p in prompts.items()]
    report(out, f"{model.name}, one engine, 1 thread", rows, costs, args.k)
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        chain = Chain(model, [15], Path(tmp), config)
        try:
            costs = batch_costs(ChainTarget(chain, "cost"), [2, 3, 5, 9, 17])
            rows = [(t, measure(lambda s: ChainTarget(chain, s), p, args, stop))
                    for t, p in prompts.items()]
        finally:
            chain.close()
    report(out, f"{model.name}, chain of 2 engines [0, 15) + [15, 30), 1 thread", rows, costs,
           args.k)


if __name__ == "__main__":
    main()
