"""The pipeline across separate network hosts joined by a slow link, per codec.

    sudo .venv/bin/python bench/slow_link.py --rate 20mbit --delay 2ms

Needs root (``ip netns``, ``tc``). Builds its own test network and removes it afterwards:
three network namespaces (the orchestrator and two workers), each joined by a veth pair to
a bridge in a fourth namespace, addresses in 10.231.7.0/24, and on every host's interface
a ``tc netem`` qdisc limiting the rate and adding delay (or, on kernels without netem, a
``tbf`` token bucket limiting the rate only). Nothing is sent outside those
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

PREFIX = "orchbench"
SUBNET = "10.231.7"
HOSTS = {"orch": 10, "w0": 11, "w1": 12}
SHAPING = {"kind": "netem"}


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def netns(name: str) -> str:
    return f"{PREFIX}-{name}"


def build_network(rate: str, delay: str) -> None:
    teardown()
    sh("ip", "netns", "add", netns("br"))
    sh("ip", "netns", "exec", netns("br"), "ip", "link", "add", "br0", "type", "bridge")
    sh("ip", "netns", "exec", netns("br"), "ip", "link", "set", "br0", "up")
    for host, octet in HOSTS.items():
        ns = netns(host)
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", f"ob-{host}", "type", "veth", "peer", "name", f"oh-{host}")
        sh("ip", "link", "set", f"ob-{host}", "netns", netns("br"))
        sh("ip", "link", "set", f"oh-{host}", "netns", ns)
        sh("ip", "netns", "exec", netns("br"), "ip", "link", "set", f"ob-{host}", "master",
           "br0")
        sh("ip", "netns", "exec", netns("br"), "ip", "link", "set", f"ob-{host}", "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{SUBNET}.{octet}/24", "dev",
           f"oh-{host}")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", f"oh-{host}", "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        shape_link(ns, f"oh-{host}", rate, delay)


def shape_link(ns: str, dev: str, rate: str, delay: str) -> None:
    """netem (rate + delay) where the kernel has it, else a token bucket (rate only)."""
    netem = sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem",
               "rate", rate, "delay", delay, check=False)
    if netem.returncode:
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
           rate, "burst", "32kbit", "latency", "400ms")
        SHAPING["kind"] = "tbf: rate only, no added delay (this kernel has no netem)"


def teardown() -> None:
    for name in (*HOSTS, "br"):
        sh("ip", "netns", "del", netns(name), check=False)


def start_worker(host: str, token: str, cache: Path, logs: Path) -> subprocess.Popen:
    address = f"{SUBNET}.{HOSTS[host]}"
    env = dict(os.environ, ORCH_WORKER_TOKEN=token)
    log = (logs / f"{host}.log").open("w")
    return subprocess.Popen(
        ["ip", "netns", "exec", netns(host), sys.executable, "-m", "orchestrator.cli", "worker",
         "--host", address, "--port", "50151", "--cache-dir", str(cache / host)],
        env=env, stdout=log, stderr=log, cwd=ROOT)


def inner(args: argparse.Namespace) -> None:
    """Runs inside the orchestrator's namespace: one line of JSON per codec."""
    sys.path.insert(0, str(ROOT))
    from orchestrator.facts import read_model_facts
    from orchestrator.modelstore import resolve_model
    from orchestrator.pipeline import Pipeline, ShardStore, StepStats, make_plan
    from worker.sampling import SamplingParams

    facts = read_model_facts(resolve_model("smollm2-135m", progress=False))
    workers = [f"{SUBNET}.{HOSTS[h]}:50151" for h in ("w0", "w1")]
    prompt = prompt_tokens(args.prompt_tokens, facts.n_vocab)
    for codec in args.codecs.split(","):
        plan = make_plan(facts, workers, codec=codec,
                         context_tokens=args.prompt_tokens + args.decode_tokens + 16)
        pipeline = Pipeline(plan, facts, args.token)
        try:
            pipeline.deploy(ShardStore(Path(args.shards)))
            stats = StepStats()
            for _ in pipeline.generate("s", prompt, SamplingParams(temperature=0),
                                       args.decode_tokens + 1, stats):
                pass
            per_hop = sum(stats.wire_bytes.values()) / max(1, stats.decode_tokens)
            print(json.dumps({"codec": codec, "ttft_ms": stats.first_token_s * 1e3,
                              "decode": stats.decode_tokens / stats.decode_s,
                              "bytes": per_hop}), flush=True)
        finally:
            pipeline.close()


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
    args = ap.parse_args()
    if args.inner:
        inner(args)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root for ip netns and tc (run with sudo)")
    out = console()
    print_header(out, f"Pipeline over a {args.rate}, {args.delay} link (network namespaces)")
    token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="orch-slowlink-") as tmp:
        tmp_path = Path(tmp)
        procs = []
        try:
            build_network(args.rate, args.delay)
            procs = [start_worker(h, token, tmp_path, tmp_path) for h in ("w0", "w1")]
            time.sleep(4)
            run = sh("ip", "netns", "exec", netns("orch"), sys.executable, __file__, "--inner",
                     "--token", token, "--shards", str(tmp_path / "shards"), "--codecs",
                     args.codecs, "--prompt-tokens", str(args.prompt_tokens),
                     "--decode-tokens", str(args.decode_tokens), check=False)
            if run.returncode:
                raise SystemExit(f"inner run failed:\n{run.stderr[-3000:]}")
            rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=20)
            teardown()
    from rich.table import Table

    table = Table(title=f"SmolLM2-135M, 2 workers, {args.prompt_tokens}-token prompt, "
                        f"links of {args.rate}, {SHAPING['kind']}")
    for col in ("codec", "bytes/token/hop", "first token ms", "decode tok/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["codec"], f"{r['bytes']:.0f}", f"{r['ttft_ms']:.0f}",
                      f"{r['decode']:.1f}")
    out.print(table)


if __name__ == "__main__":
    main()
