"""Pipeline over gRPC vs llama-cpp-python in one process: decode speed, time to first token,
bytes per token per hop for each codec.

    python bench/pipeline_speed.py --models 135m,1b --repeats 3

Each repetition runs, side by side: the unsplit model in this process (plain
llama-cpp-python, ``--threads`` threads), then the same model split across ``--workers``
local worker processes on loopback (real gRPC, each worker with ``--worker-threads``).
Ratios are medians of per-repetition ratios, so slow phases of a noisy machine hit both.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import (
    console,
    get_model,
    median,
    parse_models,
    print_header,
    prompt_tokens,
    work_directory,
)
from rich.table import Table

from orchcore.facts import read_model_facts
from orchestrator.cluster.local import LocalCluster
from orchestrator.pipeline.session import GenerationStats, RunningModel
from testkit.cluster import greedy_tokens, open_model
from testkit.reference import ReferenceModel


def unsplit_run(path: Path, prompt: list[int], decode: int, threads: int
                ) -> tuple[float, float]:
    """(prompt seconds, decode tokens/s) in one process."""
    ref = ReferenceModel(path, n_ctx=len(prompt) + decode + 8, threads=threads)
    try:
        t0 = time.perf_counter()
        logits = ref.eval(prompt, all_logits=False)
        prompt_s = time.perf_counter() - t0
        token = int(logits[-1].argmax())
        t0 = time.perf_counter()
        for _ in range(decode):
            token = int(ref.eval([token], all_logits=False)[-1].argmax())
        return prompt_s, decode / (time.perf_counter() - t0)
    finally:
        ref.close()


def pipeline_run(model: RunningModel, prompt: list[int], decode: int) -> GenerationStats:
    stats = GenerationStats()
    greedy_tokens(model, prompt, decode + 1, stats)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="135m,1b")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads of the unsplit model")
    ap.add_argument("--worker-threads", default="2,1",
                    help="threads per worker, comma-separated settings to compare")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--codecs", default="f32,f16,q8_0")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    out = console()
    print_header(out, "Pipeline over gRPC vs one process")
    with work_directory(args.workdir) as workdir:
        for key in parse_models(args.models):
            bench_model(out, get_model(key, workdir), workdir, args)


def bench_model(out, model, workdir: Path, args: argparse.Namespace) -> None:
    facts = read_model_facts(model.path)
    prompt = prompt_tokens(args.prompt_tokens, facts.n_vocab)
    speed = Table(title=f"{model.label}: decode and time to first token "
                        f"({args.prompt_tokens}-token prompt, {args.decode_tokens} decode "
                        f"steps, {args.workers} workers)")
    for col in ("setup", "decode tok/s", "ratio vs unsplit", "first token ms",
                "ratio vs unsplit"):
        speed.add_column(col, justify="right" if col != "setup" else "left")
    wire = Table(title=f"{model.label}: bytes per decode token per hop")
    for col in ("codec", "bytes/token/hop", "decode tok/s"):
        wire.add_column(col, justify="right" if col != "codec" else "left")
    for wt in [int(x) for x in args.worker_threads.split(",")]:
        rows = run_setting(model, facts, prompt, workdir, args, wt, "f32")
        un_dec = median([r[1] for r in rows])
        un_ttft = median([r[0] for r in rows]) * 1e3
        dec = median([r[3].decode_tokens / r[3].decode_s for r in rows])
        ttft = median([r[3].first_token_s for r in rows]) * 1e3
        ratio_dec = median([r[3].decode_tokens / r[3].decode_s / r[1] for r in rows])
        ratio_ttft = median([r[3].first_token_s / r[0] for r in rows])
        speed.add_row(f"unsplit, {args.threads} threads", f"{un_dec:.1f}", "1.00",
                      f"{un_ttft:.0f}", "1.00")
        speed.add_row(f"{args.workers} workers x {wt} threads (f32)", f"{dec:.1f}",
                      f"{ratio_dec:.2f}x", f"{ttft:.0f}", f"{ratio_ttft:.2f}x")
    for codec in args.codecs.split(","):
        rows = run_setting(model, facts, prompt, workdir, args,
                           int(args.worker_threads.split(",")[0]), codec, repeats=1)
        stats = rows[0][3]
        per_hop = [total / stats.decode_tokens for total in stats.wire_bytes.values()]
        wire.add_row(codec, " / ".join(f"{b:.0f}" for b in per_hop),
                     f"{stats.decode_tokens / stats.decode_s:.1f}")
    out.print(speed)
    out.print(wire)


def run_setting(model, facts, prompt, workdir, args, worker_threads: int, codec: str,
                repeats: int | None = None) -> list[tuple[float, float, float,
                                                        GenerationStats]]:
    rows = []
    with LocalCluster(args.workers, workdir / "workers", worker_threads) as cluster, \
            open_model(model.path, cluster.addresses, cluster.token, workdir, codec=codec,
                       context_tokens=len(prompt) + args.decode_tokens + 16, batch_tokens=256,
                       threads=worker_threads) as running:
        pipeline_run(running, prompt[:16], 4)  # warm-up
        for _ in range(repeats or args.repeats):
            prompt_s, dec = unsplit_run(model.path, prompt, args.decode_tokens, args.threads)
            stats = pipeline_run(running, prompt, args.decode_tokens)
            rows.append((prompt_s, dec, 0.0, stats))
    return rows


if __name__ == "__main__":
    main()
