"""Hostile input, the long run: mutated GGUF headers and malformed messages for every RPC.

    .venv/bin/python bench/fuzz.py                 # 10,000 headers, 10,000 messages per RPC
    .venv/bin/python bench/fuzz.py --cases 500     # a quick look

The same checks as ``tests/test_hostile.py`` (``testkit/fuzzing.py``), many more cases. The
worker is a real ``orch worker`` process on loopback with a live stage loaded; messages that
would send it elsewhere (URLs, addresses) are pointed at a closed loopback port. Reported:
outcomes per target, findings (an unexpected exception, a status we did not choose, a hang),
the slowest answer, whether the worker lived, its RSS before and after, and how many lines
its log grew by.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import psutil
from _common import console, print_header
from rich.console import Console
from rich.table import Table

from orchcore.modelgen import ModelSpec, write_model
from orchcore.shard import LayerRange, write_shard
from orchcore.wire.channel import connect
from orchestrator.cluster.local import LocalCluster
from orchestrator.settings import OrchSettings
from testkit.fuzzing import (
    Tally,
    call_raw,
    check_header,
    keep_home,
    load_stage,
    methods,
    mutate,
    seeds,
)


def fuzz_headers(cases: int, folder: Path, rng: random.Random) -> Tally:
    model = write_model(folder / "h.gguf", ModelSpec(n_layers=2, n_vocab=300))
    shard = write_shard(model, LayerRange(1, 2), folder / "h-shard.gguf").path
    headers = [model.read_bytes(), shard.read_bytes()]
    tally = Tally()
    for _ in range(cases):
        data = mutate(rng.choice(headers), rng, edits=rng.choice((1, 2, 8)))
        started = time.monotonic()
        try:
            outcome = check_header(data, folder, "m.gguf")
        except Exception as exc:  # a finding, kept with its input's length
            outcome = "finding"
            tally.findings.append(f"{type(exc).__name__}: {exc} ({len(data)} bytes)")
        tally.calls += 1
        tally.codes[outcome] = tally.codes.get(outcome, 0) + 1
        tally.slowest_s = max(tally.slowest_s, time.monotonic() - started)
    return tally


def fuzz_rpcs(cases: int, folder: Path, rng: random.Random, out: Console
              ) -> tuple[dict[str, Tally], dict]:
    with LocalCluster(1, folder / "worker", threads_per_worker=1) as workers:
        address, token = workers.addresses[0], workers.token
        sha = load_stage(address, token, OrchSettings(), folder)
        proc = psutil.Process(workers.procs[0].pid)
        log_path = workers.log_dir / "worker-0.log"
        before = {"rss_mib": proc.memory_info().rss / 2**20,
                  "log_lines": len(log_path.read_text().splitlines())}
        link = connect(address, token, allow_plaintext=False, timeout_s=10)
        valid = seeds(token, sha)
        tallies: dict[str, Tally] = {}
        for method in methods():
            tally = tallies[method.name] = Tally()
            for n in range(cases):
                body = rng.randbytes(rng.randint(0, 1024)) if n % 4 == 0 else \
                    mutate(rng.choice(valid[method.name]), rng)
                bodies = [keep_home(method, body, token)]
                if method.request_streaming:
                    bodies.insert(0, keep_home(method, rng.choice(valid[method.name]), token))
                # Results is a subscription (open until its deadline); a legitimate probe
                # of a big shape runs for minutes on a slow core.
                deadline = {"Results": 2.0, "Probe": 300.0}.get(method.name, 30.0)
                call_raw(link.channel, method, bodies, token if n % 8 else None, deadline,
                         tally)
            out.print(f"  {method.name}: {tally.calls} calls, {len(tally.findings)} "
                          f"findings")
        link.close()
        alive = workers.procs[0].poll() is None
        after = {"rss_mib": proc.memory_info().rss / 2**20 if alive else None,
                 "log_lines": len(log_path.read_text().splitlines()), "alive": alive}
    return tallies, {"before": before, "after": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000,
                        help="mutated headers, and messages per RPC (default 10000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if not args.json:
        print_header(console(), f"fuzz: {args.cases} cases per target, seed {args.seed}")
    rng = random.Random(args.seed)
    out = console()
    with tempfile.TemporaryDirectory(prefix="orch-fuzz-") as tmp:
        folder = Path(tmp)
        started = time.monotonic()
        headers = fuzz_headers(args.cases, folder, rng)
        rpcs, worker = fuzz_rpcs(args.cases, folder, rng, out)
        elapsed = time.monotonic() - started
    targets = {"GGUF headers": headers, **{f"RPC {k}": v for k, v in rpcs.items()}}
    if args.json:
        print(json.dumps({"targets": {k: vars(v) for k, v in targets.items()},
                          "worker": worker, "seconds": elapsed}, indent=1))
        return
    table = Table("target", "cases", "outcomes", "findings", "slowest s")
    for name, tally in targets.items():
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(tally.codes.items()))
        table.add_row(name, str(tally.calls), outcomes, str(len(tally.findings)),
                      f"{tally.slowest_s:.2f}")
    out.print(table)
    for name, tally in targets.items():
        for finding in tally.findings[:5]:
            out.print(f"[red]{name}:[/] {finding[:300]}")
    b, a = worker["before"], worker["after"]
    rss = f"{a['rss_mib']:.0f}" if a["rss_mib"] is not None else "(dead)"
    out.print(f"worker alive: {a['alive']}; RSS {b['rss_mib']:.0f} -> {rss} MiB; log "
                  f"lines {b['log_lines']} -> {a['log_lines']}; {elapsed:.0f} s in all")


if __name__ == "__main__":
    main()
