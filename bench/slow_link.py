"""The pipeline across separate network hosts joined by a slow link, per codec.

    sudo .venv/bin/python bench/slow_link.py --rate 20mbit --delay 2ms

Needs root (``ip netns``, ``tc``). Builds its own test network with ``testkit/netns.py`` and
removes it afterwards: three network namespaces (the orchestrator and two workers) joined
through a bridge, every link shaped by ``tc`` (netem rate + delay, or on kernels without
netem a ``tbf`` token bucket: rate only). Nothing is sent outside those
namespaces. The workers are real ``orch worker`` processes; the orchestrator runs the same
``Pipeline`` as ``orch run``. Reported per codec: time to first token of a 512-token
prompt and decode tokens/s. All processes share this machine's CPUs, so compute is as
slow as in ``pipeline_speed.py``; what changes with the codec is the time on the wire.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, console, print_header, prompt_tokens

from testkit.netns import network, ns_exec

HOSTS = ("orch", "w0", "w1")


def start_worker(host: str, address: str, token: str, cache: Path, logs: Path
                 ) -> subprocess.Popen:
    env = dict(os.environ, ORCH_WORKER_TOKEN=token)
    log = (logs / f"{host}.log").open("w")
    return subprocess.Popen(
        [*ns_exec(host), sys.executable, "-m", "orchestrator.cli", "worker", "--host", address,
         "--port", "50151", "--cache-dir", str(cache / host)],
        env=env, stdout=log, stderr=log, cwd=ROOT)


def inner(args: argparse.Namespace) -> None:
    """Runs inside the orchestrator's namespace: one line of JSON per codec."""
    from orchcore.facts import read_model_facts
    from orchestrator.models.store import resolve_model
    from orchestrator.pipeline.session import GenerationStats
    from testkit.cluster import greedy_tokens, open_model

    path = resolve_model("smollm2-135m", progress=False)
    facts = read_model_facts(path)
    workers = args.workers.split(",")
    prompt = prompt_tokens(args.prompt_tokens, facts.n_vocab)
    for codec in args.codecs.split(","):
        with open_model(path, workers, args.token, Path(args.shards), codec=codec,
                        context_tokens=args.prompt_tokens + args.decode_tokens + 16) as model:
            stats = GenerationStats()
            greedy_tokens(model, prompt, args.decode_tokens + 1, stats)
            per_hop = sum(stats.wire_bytes.values()) / max(1, stats.decode_tokens)
            print(json.dumps({"codec": codec, "ttft_ms": stats.first_token_s * 1e3,
                              "decode": stats.decode_tokens / stats.decode_s,
                              "bytes": per_hop}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", default="20mbit", help="netem rate on every host's link")
    ap.add_argument("--delay", default="2ms", help="netem delay on every host's link")
    ap.add_argument("--codecs", default="f32,f16,q8_0")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--token", help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    ap.add_argument("--workers", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        inner(args)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root for ip netns and tc (run with sudo)")
    out = console()
    print_header(out, f"Pipeline over a {args.rate}, {args.delay} link (network namespaces)")
    token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="orch-slowlink-") as tmp, \
            network(HOSTS, rate=args.rate, delay=args.delay) as net:
        addresses = net.addresses
        tmp_path = Path(tmp)
        procs = [start_worker(h, addresses[h], token, tmp_path, tmp_path) for h in ("w0", "w1")]
        try:
            time.sleep(4)
            run = subprocess.run(
                [*ns_exec("orch"), sys.executable, __file__, "--inner", "--token", token,
                 "--shards", str(tmp_path / "shards"), "--codecs", args.codecs,
                 "--workers", ",".join(f"{addresses[h]}:50151" for h in ("w0", "w1")),
                 "--prompt-tokens", str(args.prompt_tokens),
                 "--decode-tokens", str(args.decode_tokens)], capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(f"inner run failed:\n{run.stderr[-3000:]}")
            rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=20)
        shaping = net.shaping
    from rich.table import Table

    table = Table(title=f"SmolLM2-135M, 2 workers, {args.prompt_tokens}-token prompt, "
                        f"links: {shaping}")
    for col in ("codec", "bytes/token/hop", "first token ms", "decode tok/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["codec"], f"{r['bytes']:.0f}", f"{r['ttft_ms']:.0f}",
                      f"{r['decode']:.1f}")
    out.print(table)


if __name__ == "__main__":
    main()
