"""Two pinned workers against one core: decode speed of one stream, time to first token of
a long prompt per chunk size, aggregate decode speed of concurrent sessions, and where each
decode token's time goes.

    python bench/throughput.py --models 135m,1b
    python bench/throughput.py --models 135m --rounds 2 --decode-tokens 32 \
        --prompt-tokens 256 --sessions 1,4 --batch-tokens 64,auto --spin-ms 0 --ring on

A is the unsplit model (plain llama-cpp-python, one thread) in a child process started
under ``taskset`` on the first core. B is the same model split over two local workers with
one thread each, worker i pinned to core i, planned on their probed speeds as ``orch run``
does (``--objective``, default throughput: balanced stages), and driven through the
session API; the orchestrator, this process, shares the two cores. Every round
measures A and B back to back, in alternating order, so a slow phase of a noisy machine
hits both: ratios are taken within a round, and each figure is the median over rounds with
its min-max.

B runs in variants: each ``--spin-ms`` setting (a pair of workers started with it) with the
token ring on and off. The first variant is deployed once per ``--batch-tokens`` setting
per round for the time to first token, and runs the concurrent sessions; every other
variant times one stream's decode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _common import (
    BenchModel,
    child_result,
    console,
    get_model,
    parse_models,
    print_header,
    prompt_tokens,
    work_directory,
)
from rich.console import Console
from rich.table import Table

from orchcore.chunks import StageTiming
from orchcore.facts import read_model_facts
from orchestrator.cluster.local import LocalCluster
from orchestrator.pipeline.session import GenerationStats, RunningModel
from testkit.cluster import GREEDY, greedy_tokens, open_model
from testkit.reference import ReferenceModel

SHORT_PROMPT = 16  # tokens fed before the decode runs
STAGE_TIMES = ("queue_ms", "compute_ms", "send_ms")  # StageTiming fields, in this order


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# --- A: the unsplit model in a child process on one core ---------------------------------


def run_child(args: argparse.Namespace) -> None:
    """Decode tokens/s after a short prompt, then the long prompt's time to first token
    (one batch, KV cache cleared in between), printed as JSON."""
    import llama_cpp

    path = Path(args.child)
    n_vocab = read_model_facts(path).n_vocab
    n_ctx = max(SHORT_PROMPT + args.decode_tokens, args.prompt_tokens) + 8
    ref = ReferenceModel(path, n_ctx=n_ctx, threads=1)
    try:
        token = int(ref.eval(prompt_tokens(SHORT_PROMPT, n_vocab), all_logits=False)[-1].argmax())
        t0 = time.perf_counter()
        for _ in range(args.decode_tokens):
            token = int(ref.eval([token], all_logits=False)[-1].argmax())
        decode_s = time.perf_counter() - t0
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ref.ctx), True)
        ref.positions[0] = 0
        t0 = time.perf_counter()
        ref.eval(prompt_tokens(args.prompt_tokens, n_vocab), all_logits=False)[-1].argmax()
        first_token_s = time.perf_counter() - t0
    finally:
        ref.close()
    print(json.dumps({"decode_tok_s": args.decode_tokens / decode_s,
                      "first_token_s": first_token_s}))


def unsplit(path: Path, core: int, args: argparse.Namespace) -> dict[str, float]:
    cmd = ["taskset", "-c", str(core), sys.executable, str(Path(__file__).resolve()),
           "--child", str(path), "--prompt-tokens", str(args.prompt_tokens),
           "--decode-tokens", str(args.decode_tokens)]
    return child_result(cmd)


# --- B: the split model through the session API ------------------------------------------


@dataclass
class StepTimings(GenerationStats):
    """``GenerationStats`` that also keeps each decode step's stage timings, not only the
    summed compute: one (stages, len(STAGE_TIMES)) row of ms per step."""

    steps: list[list[list[float]]] = field(default_factory=list)

    def add_decode(self, timings: Sequence[StageTiming]) -> None:
        super().add_decode(timings)
        ordered = sorted(timings, key=lambda t: t.stage_index)
        self.steps.append([[getattr(t, name) for name in STAGE_TIMES] for t in ordered])


@dataclass
class DecodeRun:
    """One session's decode: its timings and when each token arrived (perf_counter s)."""

    stats: StepTimings = field(default_factory=StepTimings)
    arrivals: list[float] = field(default_factory=list)


def decode_sessions(model: RunningModel, n_sessions: int, decode: int, n_vocab: int
                    ) -> list[DecodeRun]:
    """``n_sessions`` threads, released at once, each feeding its own short prompt and
    decoding ``decode`` tokens after the first."""
    start = threading.Barrier(n_sessions)

    def one(i: int) -> DecodeRun:
        run = DecodeRun()
        prompt = prompt_tokens(SHORT_PROMPT, n_vocab, seed=1 + i)
        start.wait(timeout=60)
        for _ in model.stream(model.new_session(GREEDY), prompt, decode + 1, run.stats):
            run.arrivals.append(time.perf_counter())
        return run

    with ThreadPoolExecutor(n_sessions) as pool:
        return list(pool.map(one, range(n_sessions)))


def aggregate_tok_s(runs: Sequence[DecodeRun]) -> float:
    """Tokens/s while every session decodes: from the last first token to the first last
    token (prompts and stragglers excluded)."""
    begin = max(r.arrivals[0] for r in runs)
    end = min(r.arrivals[-1] for r in runs)
    if end <= begin:
        raise SystemExit("the sessions never all decoded at once: raise --decode-tokens")
    return sum(begin < t <= end for r in runs for t in r.arrivals) / (end - begin)


@dataclass(frozen=True)
class Breakdown:
    """Mean ms per decode token: each stage's STAGE_TIMES, and the rest of the step."""

    stages: np.ndarray  # (stages, len(STAGE_TIMES))
    rest_ms: float  # step minus every stage's queue, compute and send: transit, orchestrator
    step_ms: float  # one session's wait for its next token


def breakdown(runs: Sequence[DecodeRun]) -> Breakdown:
    stages = np.concatenate([np.asarray(r.stats.steps) for r in runs])
    steps = np.concatenate([np.diff(r.arrivals) * 1e3 for r in runs])
    return Breakdown(stages.mean(axis=0), float((steps - stages.sum(axis=(1, 2))).mean()),
                     float(steps.mean()))


@dataclass(frozen=True)
class Variant:
    """A way to run B: the workers' spin before blocking, and the token ring on or off."""

    spin_ms: float
    ring: bool

    @property
    def label(self) -> str:
        return f"ring {'on' if self.ring else 'off'}, spin {self.spin_ms:g} ms"


@dataclass
class Round:
    a: dict[str, float] = field(default_factory=dict)  # the child's JSON
    tok_s: dict[int, float] = field(default_factory=dict)  # sessions -> aggregate tokens/s
    steps: dict[int, Breakdown] = field(default_factory=dict)  # sessions -> breakdown
    variants: dict[Variant, tuple[float, Breakdown]] = field(default_factory=dict)  # 1 stream
    first_token_s: dict[str, float] = field(default_factory=dict)  # chunk setting -> s
    chunks: dict[str, int] = field(default_factory=dict)  # chunk setting -> tokens used
    cuts: set[str] = field(default_factory=set)  # B's layer ranges, as planned


AUTO_CEILING = 512  # the largest chunk "auto" may pick


def split_round(out: Round, clusters: dict[float, LocalCluster], model: BenchModel,
                workdir: Path, args: argparse.Namespace) -> None:
    """The first variant: first token per chunk setting, then the concurrent sessions;
    every other variant: one stream's decode."""
    n_vocab = read_model_facts(model.path).n_vocab
    prompt = prompt_tokens(args.prompt_tokens, n_vocab)
    main, *others = args.variants
    for i, chunk in enumerate(args.batch_tokens):
        auto = chunk == "auto"
        cluster = clusters[main.spin_ms]
        with open_model(model.path, cluster.addresses, cluster.token, workdir, threads=1,
                        batch_tokens=AUTO_CEILING if auto else int(chunk), measure=True,
                        max_sessions=max(args.sessions), token_ring=main.ring,
                        context_tokens=args.context_tokens,
                        objective=args.objective) as running:
            out.cuts.add(" + ".join(
                f"{s.layers} ({s.device.decode_s_per_layer * 1e3:.2f} ms/layer probed)"
                for s in running.plan.stages))
            out.chunks[chunk] = running.plan.prompt_chunk(len(prompt))
            greedy_tokens(running, prompt[:SHORT_PROMPT], 4)  # warm-up
            stats = GenerationStats()
            greedy_tokens(running, prompt, 1, stats)
            out.first_token_s[chunk] = stats.first_token_s
            for n in args.sessions if i == 0 else ():
                runs = decode_sessions(running, n, args.decode_tokens, n_vocab)
                out.tok_s[n], out.steps[n] = aggregate_tok_s(runs), breakdown(runs)
    out.variants[main] = out.tok_s[1], out.steps[1]
    for variant in others:
        cluster = clusters[variant.spin_ms]
        with open_model(model.path, cluster.addresses, cluster.token, workdir, threads=1,
                        token_ring=variant.ring, context_tokens=args.context_tokens,
                        measure=True, objective=args.objective) as running:
            greedy_tokens(running, prompt[:SHORT_PROMPT], 4)  # warm-up
            runs = decode_sessions(running, 1, args.decode_tokens, n_vocab)
            out.variants[variant] = aggregate_tok_s(runs), breakdown(runs)


# --- the tables -------------------------------------------------------------------------


def spread(values: Sequence[float], spec: str) -> str:
    """Median (min-max) over rounds."""
    return f"{np.median(values):{spec}} ({min(values):{spec}}-{max(values):{spec}})"


def table(title: str, columns: Sequence[str]) -> Table:
    out = Table(title=title)
    for i, col in enumerate(columns):
        out.add_column(col, justify="left" if i == 0 else "right")
    return out


A_NAME = "A: unsplit, 1 thread, 1 core"


def report(out: Console, model: BenchModel, split: str, rounds: list[Round],
           args: argparse.Namespace) -> None:
    for part in (decode_table(rounds, split, args), prefill_table(rounds, args),
                 sessions_table(rounds, args), stage_table(rounds, args)):
        part.title = f"{model.label}: {part.title}"
        out.print(part)


def decode_table(rounds: list[Round], split: str, args: argparse.Namespace) -> Table:
    a = [r.a["decode_tok_s"] for r in rounds]
    out = table(f"decode, one stream ({args.decode_tokens} tokens after a {SHORT_PROMPT}-token "
                f"prompt; median (min-max) of {len(rounds)} rounds); B: {split}",
                ("setup", "tokens/s", "B/A"))
    out.add_row(A_NAME, spread(a, ".1f"), "")
    for v in args.variants:
        b = [r.variants[v][0] for r in rounds]
        out.add_row(f"B, {v.label}", spread(b, ".1f"),
                    spread([x / y for x, y in zip(b, a, strict=True)], ".2f"))
    return out


def prefill_table(rounds: list[Round], args: argparse.Namespace) -> Table:
    a = [r.a["first_token_s"] * 1e3 for r in rounds]
    out = table(f"time to first token, {args.prompt_tokens}-token prompt (A in one batch, B "
                f"in chunks all sent at once)", ("setup", "ms", "prompt tokens/s", "B/A time"))
    out.add_row(A_NAME, spread(a, ".0f"), spread([args.prompt_tokens / x * 1e3 for x in a],
                                                 ".0f"), "")
    for chunk in args.batch_tokens:
        b = [r.first_token_s[chunk] * 1e3 for r in rounds]
        used = sorted({r.chunks[chunk] for r in rounds})
        what = (f"measured: {'/'.join(map(str, used))}" if chunk == "auto" else chunk)
        out.add_row(f"B, chunks of {what} tokens", spread(b, ".0f"),
                    spread([args.prompt_tokens / x * 1e3 for x in b], ".0f"),
                    spread([x / y for x, y in zip(b, a, strict=True)], ".2f"))
    return out


def sessions_table(rounds: list[Round], args: argparse.Namespace) -> Table:
    out = table(f"aggregate decode of concurrent sessions on B ({args.decode_tokens} tokens "
                f"each, counted while all decode)",
                ("sessions", "tokens/s", "vs 1 session", "vs A (one stream)"))
    for s in args.sessions:
        out.add_row(str(s), spread([r.tok_s[s] for r in rounds], ".1f"),
                    spread([r.tok_s[s] / r.tok_s[1] for r in rounds], ".2f"),
                    spread([r.tok_s[s] / r.a["decode_tok_s"] for r in rounds], ".2f"))
    return out


def stage_table(rounds: list[Round], args: argparse.Namespace) -> Table:
    """ms per decode token, per stage: queue (behind other chunks), compute (including the
    hidden-state codec), send (hand-off to the stream to the next stage; the last stage
    sends nothing), and idle (the rest of the step: waiting for its input). What no stage
    accounts for is transit on every hop plus the orchestrator: the timings carry no clock
    readings that would split it by hop."""
    n_stages = rounds[0].steps[1].stages.shape[0]
    kept = [(i, k) for i in range(n_stages) for k in range(len(STAGE_TIMES))
            if i < n_stages - 1 or STAGE_TIMES[k] != "send_ms"]
    columns = [f"{i} {STAGE_TIMES[k].removesuffix('_ms')}" for i, k in kept]
    columns += [f"{i} idle" for i in range(n_stages)]
    out = table(f"ms per decode token and stage on B (mean over tokens, median of "
                f"{len(rounds)} rounds)", ("B", *columns, "transit + orch.", "step"))
    main = args.variants[0]
    rows = [(f"{n} session{'s' if n > 1 else ''}, {main.label}", [r.steps[n] for r in rounds])
            for n in args.sessions]
    rows += [(f"1 session, {v.label}", [r.variants[v][1] for r in rounds])
             for v in args.variants[1:]]
    for label, b in rows:
        cells = [np.median([x.stages[i, k] for x in b]) for i, k in kept]
        cells += [np.median([x.step_ms - x.stages[i].sum() for x in b])
                  for i in range(n_stages)]
        cells += [np.median([x.rest_ms for x in b]), np.median([x.step_ms for x in b])]
        out.add_row(label, *(f"{c:.2f}" for c in cells))
    return out


# --- the run ----------------------------------------------------------------------------


def bench_model(out: Console, model: BenchModel, workdir: Path, args: argparse.Namespace
                ) -> None:
    cores = sorted(os.sched_getaffinity(0))
    rounds = []
    with contextlib.ExitStack() as stack:
        clusters = {}
        for spin in sorted({v.spin_ms for v in args.variants}):
            os.environ["ORCH_WORKER_SPIN_MS"] = f"{spin:g}"  # the workers read it at start
            clusters[spin] = stack.enter_context(LocalCluster(
                2, workdir / f"workers-spin{spin:g}", threads_per_worker=1, pin_cores=True))
        os.environ.pop("ORCH_WORKER_SPIN_MS")
        for k in range(args.rounds):
            r = Round()
            started = time.perf_counter()
            for side in ("A", "B") if k % 2 == 0 else ("B", "A"):
                if side == "A":
                    r.a = unsplit(model.path, cores[0], args)
                else:
                    split_round(r, clusters, model, workdir, args)
            rounds.append(r)
            out.print(f"  {model.key} round {k + 1}/{args.rounds}: "
                      f"{time.perf_counter() - started:.0f} s", highlight=False)
    cuts = " or ".join(sorted(set().union(*(r.cuts for r in rounds))))
    split = f"2 workers x 1 thread (cores {cores[0]}, {cores[1 % len(cores)]}), layers {cuts}"
    report(out, model, split, rounds, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="135m,1b")
    ap.add_argument("--rounds", type=int, default=3, help="A then B (or B then A) each")
    ap.add_argument("--decode-tokens", type=int, default=128, help="per session")
    ap.add_argument("--prompt-tokens", type=int, default=2048,
                    help="the prompt whose time to first token is measured")
    ap.add_argument("--batch-tokens", type=lambda t: t.split(","), default=["auto"],
                    help="B's prompt chunk sizes to compare, comma-separated: tokens, or "
                         "auto (planned from the workers' probed speeds, at most "
                         f"{AUTO_CEILING}); each adds one deployment and prompt per round")
    ap.add_argument("--spin-ms", type=lambda t: [float(x) for x in t.split(",")],
                    default=[0.0, 2.0], help="the workers' spin_ms settings to compare")
    ap.add_argument("--ring", type=lambda t: [x.strip() == "on" for x in t.split(",")],
                    default=[True, False], help="token ring settings to compare: on,off")
    ap.add_argument("--sessions", type=int_list, default=[1, 4, 8],
                    help="concurrent sessions on B, comma-separated (1 is always run)")
    ap.add_argument("--objective", default="throughput", choices=("latency", "throughput"),
                    help="B's plan objective: throughput balances the stages by their probed "
                         "speed (the orchestrator shares the cores here, so they differ)")
    ap.add_argument("--workdir", default=None, help="kept afterwards (generated model, shards)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args)
        return
    args.sessions = sorted({1, *args.sessions})
    # The first is the main setting (first token, sessions); the others time one stream.
    args.variants = [Variant(spin, ring) for ring in args.ring for spin in args.spin_ms]
    args.context_tokens = max(args.prompt_tokens, SHORT_PROMPT) + args.decode_tokens + 16
    out = console()
    print_header(out, "Two pinned workers vs one core: decode, first token, sessions")
    with work_directory(args.workdir) as workdir:
        for key in parse_models(args.models):
            bench_model(out, get_model(key, workdir), workdir, args)


if __name__ == "__main__":
    main()
