"""Who fetches what when a model is run from where it is published: bytes fetched by the
orchestrator and by each worker against the model's size, for 2 and 3 local workers, and the
time from `orch run URL` to the first token, cold (nothing cached) and warm, against
`orch run FILE` with the file on disk.

    python bench/remote_fetch.py --models 135m,1b --rounds 2

The model is served by a Range-capable HTTP server on loopback (testkit/httpserver.py) that
counts the bytes it sends per client.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import console, get_model, median, mib, parse_models, print_header, work_directory
from rich.table import Table

from orchcore.facts import read_model_facts
from testkit.httpserver import serve

PROMPT = ["The capital of France is", "--no-chat", "--max-tokens", "1", "--temperature", "0",
          "--stats"]


def orch_run(model: str, workers: int, cache: Path) -> tuple[float, subprocess.CompletedProcess]:
    env = dict(os.environ, ORCH_CACHE_DIR=str(cache), COLUMNS="200")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", model, *PROMPT,
                           "--local", str(workers)], env=env, capture_output=True, text=True,
                          timeout=1800)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"orch run {model} failed:\n{done.stderr}")
    return elapsed, done


def bytes_table(out, name: str, path: Path, workers: int) -> None:
    facts = read_model_facts(path)
    with tempfile.TemporaryDirectory() as tmp, serve({path.name: path.read_bytes()}) as server:
        orch_run(server.url(path.name), workers, Path(tmp))
        served = dict(server.served_by_client)
    table = Table(title=f"{name}, {workers} workers: bytes fetched ({mib(facts.file_size):.1f} "
                        f"MiB model)")
    for col in ("who", "MiB", "share of the model"):
        table.add_column(col, justify="right")
    orchestrator = served.pop("orchestrator", 0)
    table.add_row("orchestrator", f"{mib(orchestrator):.2f}",
                  f"{orchestrator / facts.file_size:.1%}")
    for who, n in sorted(served.items()):
        table.add_row(f"worker {who}", f"{mib(n):.1f}", f"{n / facts.file_size:.1%}")
    total = sum(served.values())
    table.add_row("all workers", f"{mib(total):.1f}", f"{total / facts.file_size:.1%}")
    out.print(table)


def time_table(out, name: str, path: Path, workers: int, rounds: int) -> None:
    rows: dict[str, list[float]] = {"URL cold": [], "URL warm": [], "file cold": [],
                                    "file warm": []}
    with serve({path.name: path.read_bytes()}) as server:
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as tmp:
                for label, model in (("URL", server.url(path.name)), ("file", str(path))):
                    cache = Path(tmp) / label
                    rows[f"{label} cold"].append(orch_run(model, workers, cache)[0])
                    rows[f"{label} warm"].append(orch_run(model, workers, cache)[0])
    table = Table(title=f"{name}, {workers} workers: `orch run` to its first token, "
                        f"whole command (s), median of {rounds}")
    table.add_column("case")
    table.add_column("median s", justify="right")
    table.add_column("all rounds", justify="right")
    for label, values in rows.items():
        table.add_row(label, f"{median(values):.1f}", " ".join(f"{v:.1f}" for v in values))
    out.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="135m", help="comma-separated: 135m, 1b")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    out = console()
    print_header(out, "remote fetch: bytes and time to first token")
    with work_directory(args.workdir) as workdir:
        for key in parse_models(args.models):
            model = get_model(key, workdir)
            for workers in (2, 3):
                bytes_table(out, key, model.path, workers)
            time_table(out, key, model.path, 3, args.rounds)


if __name__ == "__main__":
    main()
