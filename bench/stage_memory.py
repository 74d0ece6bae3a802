"""Each stage's peak memory against the estimate it was planned and admitted with.

For each model: local workers (1 thread each), the model planned and deployed over them,
one session of one full prompt chunk plus 64 decode tokens; then every worker's VmHWM
(its peak resident set) is read and compared with its stage's estimate
(``orchcore.memory``). The target: the peak is at or below the estimate, and at most
max(40 MiB, 1% of the estimate) below it.

The model is deployed as ``orch run`` deploys it (no rows kept for prompt logprobs) and
the session speculates (``ngram:16``) over a prompt that repeats itself, so the last
stage verifies chunks of 17 rows with logits for each: the widest chunk of logits an
estimate counts.

    python bench/stage_memory.py                       # 135m, gemma3, 1b
    python bench/stage_memory.py --models qwen3-8b     # 4.6 GB: ~14 GB of disk, 3 workers
    python bench/stage_memory.py --models moe          # the 16.8 GB MoE: ~17 GB of disk
                                                       # three times over, 3 x 7000 MiB

The generated full-size models (``qwen3-8b``, ``moe``: ``orchcore.modelgen`` presets) are
written into the work folder and deleted afterwards, with the workers' caches; the others
come from the test model cache (``testkit.models``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from _common import console, print_header, prompt_tokens, work_directory
from rich.table import Table

from orchcore import modelgen
from orchcore.facts import read_model_facts
from orchcore.memory import MIB, MemoryEstimate
from orchestrator.cluster.local import LocalCluster
from orchestrator.pipeline.session import GenerationStats
from testkit.cluster import greedy_tokens, open_model
from testkit.models import fetched_model, generated_model

DECODE_TOKENS = 64
SPECULATE = "ngram:16"  # a verification chunk of 17 rows, the most a run may send
TOLERANCE_BYTES = 40 * MIB  # the estimate may be this much above the peak (or 1% of it)


@dataclass(frozen=True)
class Setup:
    """How one model is run: workers, their budgets, the engine settings."""

    workers: int = 2
    budget_mb: int = 0  # 0: each worker's default
    context_tokens: int = 2048
    max_sessions: int = 2
    batch_tokens: int = 256


SETUPS = {
    "135m": Setup(),
    "gemma3": Setup(),
    "1b": Setup(),
    "qwen3-8b": Setup(workers=3, budget_mb=2368, context_tokens=512, max_sessions=1),
    "moe": Setup(workers=3, budget_mb=7000, context_tokens=512, max_sessions=1),
}
GENERATED = {"qwen3-8b": "qwen3-8b", "moe": "qwen3moe-30b-a3b"}  # key -> modelgen preset


@dataclass(frozen=True)
class StageRow:
    model: str
    index: int
    layers: str
    estimate: MemoryEstimate
    reported_baseline: int  # what the worker measured at start
    idle: int  # VmRSS before anything was loaded
    loaded: int  # VmRSS after the load
    peak: int  # VmHWM at the end

    @property
    def gap(self) -> int:
        return self.estimate.total - self.peak

    @property
    def within(self) -> bool:
        return 0 <= self.gap <= max(TOLERANCE_BYTES, self.estimate.total // 100)


def proc_status(pid: int) -> dict[str, int]:
    """The memory lines of /proc/PID/status, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key.startswith(("Vm", "Rss")):
                out[key] = int(value.split()[0]) * 1024
    return out


def model_path(key: str, workdir: Path) -> Path:
    if key == "135m":
        return fetched_model("smollm2-135m")
    if key == "gemma3":
        return fetched_model("gemma3-270m")
    if key == "1b":
        return generated_model(modelgen.preset("bench-1b-q4_0"), "1b.gguf")
    name = GENERATED[key]
    path = workdir / f"{name}.gguf"
    if not path.exists():
        with console().status(f"writing {name}"):
            modelgen.write_model(path, modelgen.preset(name))
    return path


def measure(key: str, setup: Setup, workdir: Path) -> list[StageRow]:
    path = model_path(key, workdir)
    facts = read_model_facts(path)
    budgets = [setup.budget_mb] * setup.workers if setup.budget_mb else None
    folder = workdir / f"workers-{key}"
    try:
        with LocalCluster(setup.workers, folder, threads_per_worker=1,
                          memory_budgets_mb=budgets) as cluster:
            pids = {a: p.pid for a, p in zip(cluster.addresses, cluster.procs, strict=True)}
            idle = {a: proc_status(pid)["VmRSS"] for a, pid in pids.items()}
            with open_model(path, cluster.addresses, cluster.token, workdir,
                            context_tokens=setup.context_tokens,
                            max_sessions=setup.max_sessions,
                            batch_tokens=setup.batch_tokens, threads=1, logprob_rows=1,
                            speculate=SPECULATE) as model:
                return _run(key, model, facts.n_vocab, pids, idle)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if key in GENERATED:
            path.unlink(missing_ok=True)


def _run(key: str, model, n_vocab: int, pids: dict[str, int], idle: dict[str, int]
         ) -> list[StageRow]:
    """One full prompt chunk and the decode tokens in one session; each stage's figures.

    The prompt repeats 32 tokens, the 16th of them the token the model answers a
    one-token prompt with (a first, 2-token session). A real model copies the pattern, a
    generated one answers that token whatever the prompt; either way the drafter finds
    16 tokens to draft, and the last stage verifies a chunk of 17 rows."""
    loaded = {a: proc_status(pid)["VmRSS"] for a, pid in pids.items()}
    favourite = greedy_tokens(model, prompt_tokens(1, n_vocab), 1)[0]
    others = prompt_tokens(31, n_vocab)
    block = [*others[:15], favourite, *others[15:]]
    prompt = (block * model.plan.batch_tokens)[:model.plan.batch_tokens]
    stats = GenerationStats()
    greedy_tokens(model, prompt, DECODE_TOKENS, stats)
    spec = stats.speculation
    console().print(f"{key}: {spec.drafted} drafts in {spec.drafting_passes} of "
                    f"{spec.passes} passes, {spec.accepted} accepted", highlight=False)
    rows = []
    for stage, client in zip(model.plan.stages, model.path.clients, strict=True):
        rows.append(StageRow(key, stage.index, str(stage.layers), stage.memory,
                             client.info().baseline_bytes, idle[stage.worker],
                             loaded[stage.worker], proc_status(pids[stage.worker])["VmHWM"]))
    return rows


def table(rows: list[StageRow]) -> Table:
    t = Table(title="Peak memory per stage against its estimate (MiB = 2^20 bytes)")
    for name in ("model", "stage", "layers", "idle", "process", "weights", "KV", "logits",
                 "compute", "estimate", "loaded", "VmHWM", "estimate - peak", "target"):
        t.add_column(name, justify="left" if name in ("model", "layers") else "right")
    for r in rows:
        e = r.estimate
        t.add_row(r.model, str(r.index), r.layers, f"{r.idle / MIB:.0f}",
                  f"{e.baseline / MIB:.0f}",
                  f"{e.weights / MIB:.0f}", f"{e.kv_cache / MIB:.0f}", f"{e.logits / MIB:.0f}",
                  f"{e.compute / MIB:.0f}", f"{e.total / MIB:.0f}", f"{r.loaded / MIB:.0f}",
                  f"{r.peak / MIB:.0f}", f"{r.gap / MIB:+.1f}", "yes" if r.within else "NO")
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="135m,gemma3,1b",
                   help=f"comma list of: {', '.join(SETUPS)}")
    p.add_argument("--workdir", help="work folder (default: a temporary one)")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    if unknown := [k for k in keys if k not in SETUPS]:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(SETUPS)}")
    out = console()
    print_header(out, "Stage memory: each worker's peak against its estimate")
    rows: list[StageRow] = []
    with work_directory(args.workdir) as workdir:
        for key in keys:
            s = SETUPS[key]
            out.print(f"{key}: {s.workers} workers x 1 thread, budget "
                      f"{s.budget_mb or 'default'} MiB, context {s.context_tokens} x "
                      f"{s.max_sessions} sessions, one chunk of {s.batch_tokens} tokens + "
                      f"{DECODE_TOKENS} decode", highlight=False)
            rows += measure(key, s, workdir)
            out.print(table([r for r in rows if r.model == key]))
    out.print(table(rows))
    return 0 if all(r.within for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
