"""Peak memory of a stage engine holding half of a model's layers vs the whole model.

Every measurement runs in a fresh interpreter (this script with ``--child``), which loads
one ``StageEngine``, runs a prompt and some decode steps in one session (so the KV cache,
the compute buffers and every weight page are touched), then reports ``ru_maxrss`` and
``VmHWM``. Mapped file pages that were touched count in RSS, which is what a machine has
to hold.

Target (issue): a process holding half the layers peaks within
``weights of its shard + its KV cache + 150 MiB``, where weights = the tensor bytes of the
shard file and KV = kv bytes per token per layer x layers x context tokens x sessions.

Variants (``--variants``):

* ``engine``: the engine as configured by default (on a CPU where llama.cpp repacks the
  weights, the file is read rather than mapped).
* ``mmap``: ``EngineConfig(mmap=True)``: the file mapped even when weights are repacked,
  so the pages read during the repack stay resident next to the repacked copy.
* ``no-repack``: ``EngineConfig(extra_buffer_types=False)``: weights used straight from
  the mapping, no repacked copy.

    python bench/engine_memory.py                  # both models, all variants
    python bench/engine_memory.py --models 1b --variants engine
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import _common as common
from _common import MIB, mib
from rich.console import Console
from rich.table import Table

from orchcore.engine import EngineConfig
from orchcore.facts import read_model_facts

VARIANTS = ("engine", "mmap", "no-repack")
_DEFAULTS = {f.name: f.default for f in fields(EngineConfig)}


# --- the child: one engine in a fresh process ------------------------------------------


def _proc_status() -> dict[str, int]:
    """Bytes of the memory lines of /proc/self/status that we report."""
    wanted = {"VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"}
    out: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in wanted:
                out[key] = int(value.split()[0]) * 1024  # kB
    return out


def run_child(args: argparse.Namespace) -> None:
    """Load ``args.child`` (or nothing: ``none``), run prompt + decode, print JSON."""
    import numpy as np

    from orchcore.engine import StageEngine

    result: dict[str, object] = {"path": args.child, "variant": args.variant}
    if args.child != "none":
        config = EngineConfig(
            context_tokens=args.context_tokens, max_sessions=args.max_sessions,
            threads=args.threads,
            extra_buffer_types=False if args.variant == "no-repack" else None,
            mmap=True if args.variant == "mmap" else None)
        t0 = time.perf_counter()
        engine = StageEngine(args.child, config)
        t1 = time.perf_counter()
        result["after_load"] = _proc_status()
        rng = np.random.default_rng(0)
        facts = engine.facts
        vocab = int(facts.metadata.get("orch.shard.source_vocab_size", facts.n_vocab))
        n = args.prompt_tokens

        def step(positions: range, tokens: list[int]) -> np.ndarray:
            if engine.role.is_first:
                return engine.forward("s", positions, tokens=tokens)
            hidden = rng.standard_normal((len(positions), engine.n_embd), dtype=np.float32)
            return engine.forward("s", positions, hidden=hidden)

        out = step(range(n), common.prompt_tokens(n, vocab))
        t2 = time.perf_counter()
        for i in range(args.decode_tokens):
            token = int(np.argmax(out[-1])) % vocab if engine.role.is_last else 5
            out = step(range(n + i, n + i + 1), [token])
        t3 = time.perf_counter()
        result.update(load_s=t1 - t0, prompt_s=t2 - t1, decode_s=t3 - t2)
    result["end"] = _proc_status()
    result["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB
    print(json.dumps(result))


# --- the parent: plan, spawn, tabulate -------------------------------------------------


@dataclass(frozen=True)
class Row:
    model: str
    variant: str
    what: str
    weights: int  # bytes
    kv: int  # bytes
    result: dict
    slack: int

    @property
    def peak(self) -> int:
        return int(self.result["ru_maxrss"])

    @property
    def hwm(self) -> int:
        return int(self.result["end"]["VmHWM"])

    @property
    def budget(self) -> int:
        return self.weights + self.kv + self.slack

    @property
    def within(self) -> bool:
        return max(self.peak, self.hwm) <= self.budget


# Linux carries the peak RSS of the address space a process had before exec() into its
# ru_maxrss, so a child exec'd straight from this process (which holds gguf-py's parsed
# vocabularies, 100+ MiB) would report at least our own RSS. A small interpreter in between
# starts the measured process from a clean, small address space.
_TRAMPOLINE = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def spawn(args: argparse.Namespace, path: str, variant: str) -> dict:
    script = str(Path(__file__).resolve())
    cmd = [sys.executable, "-c", _TRAMPOLINE, sys.executable, script, "--child", path,
           "--variant", variant, "--threads", str(args.threads),
           "--context-tokens", str(args.context_tokens),
           "--max-sessions", str(args.max_sessions),
           "--prompt-tokens", str(args.prompt_tokens),
           "--decode-tokens", str(args.decode_tokens)]
    return common.child_result(cmd)


def weights_and_kv(path: Path, args: argparse.Namespace) -> tuple[int, int]:
    facts = read_model_facts(path)
    weights = sum(t.n_bytes for t in facts.tensors)
    kv = (facts.kv_bytes_per_token_per_layer() * facts.n_layers * args.context_tokens
          * args.max_sessions)
    return weights, kv


def measure_model(args: argparse.Namespace, model: common.BenchModel, workdir: Path,
                  console: Console) -> list[Row]:
    facts = read_model_facts(model.path)
    targets = [(f"whole, {facts.n_layers} layers", model.path)]
    targets += [(f"half {r}", p) for r, p in common.halves(model.path, workdir)]
    rows = []
    for variant in args.variants:
        for what, path in targets:
            weights, kv = weights_and_kv(path, args)
            with console.status(f"{model.key} {variant}: {what}"):
                result = spawn(args, str(path), variant)
            row = Row(model.key, variant, what, weights, kv, result, args.slack_mib * MIB)
            rows.append(row)
            console.print(f"  {model.key:5} {variant:10} {what:22} peak {mib(row.peak):7.0f} "
                          f"MiB  (load {result['load_s']:.1f} s, prompt "
                          f"{result['prompt_s']:.1f} s, decode {result['decode_s']:.1f} s)",
                          highlight=False)
    return rows


def table(rows: list[Row], baseline: dict | None) -> Table:
    t = Table(title="Peak memory per process (MiB = 2^20 bytes)", show_lines=False)
    for name in ("model", "variant", "what", "weights", "KV", "peak RSS", "VmHWM",
                 "anon / file at end", "budget", "within target"):
        t.add_column(name, justify="left" if name in ("model", "variant", "what") else "right")
    for r in rows:
        end = r.result["end"]
        t.add_row(r.model, r.variant, r.what, f"{mib(r.weights):.0f}", f"{mib(r.kv):.0f}",
                  f"{mib(r.peak):.0f}", f"{mib(r.hwm):.0f}",
                  f"{mib(end['RssAnon']):.0f} / {mib(end['RssFile']):.0f}",
                  f"{mib(r.budget):.0f}",
                  ("yes" if r.within else "NO") + ("" if "half" in r.what else " (ref.)"))
    if baseline is not None:
        t.add_row("-", "-", "interpreter + imports only", "0", "0",
                  f"{mib(baseline['ru_maxrss']):.0f}", f"{mib(baseline['end']['VmHWM']):.0f}",
                  f"{mib(baseline['end']['RssAnon']):.0f} / "
                  f"{mib(baseline['end']['RssFile']):.0f}", "-", "-")
    return t


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="1b,135m", help="comma list of: 1b, 135m")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma list of: {', '.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--context-tokens", type=int, default=_DEFAULTS["context_tokens"],
                   help="KV room per session (EngineConfig default)")
    p.add_argument("--max-sessions", type=int, default=_DEFAULTS["max_sessions"],
                   help="sessions with a KV cache (EngineConfig default)")
    p.add_argument("--slack-mib", type=int, default=150,
                   help="allowance above weights + KV in the target")
    p.add_argument("--workdir", help="keep generated model and shards here (default: temp)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="engine", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is None:
        args.models = common.parse_models(args.models)
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        bad = [v for v in args.variants if v not in VARIANTS]
        if bad or not args.variants:
            p.error(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        run_child(args)
        return
    console = common.console()
    common.print_header(console, "Engine memory: half of the layers vs the whole model")
    console.print(f"each process: {args.prompt_tokens}-token prompt + {args.decode_tokens} "
                  f"decode steps, {args.threads} threads, KV room {args.context_tokens} "
                  f"tokens x {args.max_sessions} sessions (f16); budget = weights + KV + "
                  f"{args.slack_mib} MiB", highlight=False)
    rows: list[Row] = []
    with common.work_directory(args.workdir) as workdir:
        for key in args.models:
            model = common.get_model(key, workdir)
            console.print(f"[bold]{key}[/]: {model.label}: {model.path}", highlight=False)
            rows += measure_model(args, model, workdir, console)
    baseline = spawn(args, "none", "engine")
    console.print(table(rows, baseline))
    for key in args.models:
        for variant in args.variants:
            group = [r for r in rows if r.model == key and r.variant == variant]
            whole = next(r for r in group if "whole" in r.what)
            for r in group:
                if r is not whole:
                    margin = r.budget - max(r.peak, r.hwm)
                    console.print(f"{key} {variant} {r.what}: peak {mib(r.peak):.0f} MiB = "
                                  f"{r.peak / whole.peak:.2f} x whole; "
                                  f"{mib(abs(margin)):.0f} MiB "
                                  f"{'under' if margin >= 0 else 'OVER'} budget",
                                  highlight=False)


if __name__ == "__main__":
    main()
