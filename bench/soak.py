"""Soak: many requests through ``orch serve``, watching each process's memory and files.

    python bench/soak.py --requests 1000 --concurrency 4 --workers 2

Starts ``orch serve`` on the real SmolLM2-135M with ``--workers`` local worker processes
(as a command, its own cache folder), then sends ``--requests`` requests to its OpenAI API
over loopback: the first half one at a time, the second half from ``--concurrency``
clients at once. The requests mix chat and completions, streamed and whole answers,
prompts of a few to a few hundred words and 1 to 48 tokens; about one in ten is a stream
the client closes after a few chunks (counted as cancelled, not failed). A warm-up of the
same mix comes first and is not counted.

Every ``--sample-s`` seconds, and at the start, after the warm-up, every tenth of the
requests and at the end, each process's resident memory (VmRSS), open file descriptors
and threads are read from ``/proc``. Reported: those over time, the growth from after the
warm-up to the end per process (target: RSS under 5%), and per phase the outcomes and
latency percentiles. A request is failed when it gets an error, an answer without its end
(``finish_reason``, ``[DONE]``), or no answer within ``--timeout-s``; a 429 (queue full)
is counted apart. At the end the server must report no answer in flight or waiting.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package is built on
from _common import REAL, ROOT, console, machine_facts, print_header, work_directory
from _procwatch import ProcWatch, Snapshot, children, cmdline
from rich.console import Console
from rich.markup import escape
from rich.table import Table

RSS_TARGET = 0.05  # growth from after the warm-up to the end, per process
PROMPT_WORDS = ((3, 0.30), (12, 0.30), (60, 0.25), (250, 0.15))  # (words, share)
MAX_TOKENS = ((1, 0.15), (4, 0.35), (16, 0.35), (48, 0.15))
CANCEL_SHARE = 0.10  # streams of up to 64 tokens that the client leaves after 1-4 chunks
WORDS = ("river", "stone", "light", "garden", "window", "morning", "market", "paper",
         "music", "winter", "engine", "island", "letter", "mountain", "station", "bridge")


@dataclass(frozen=True)
class Ask:
    index: int
    api: str  # "chat" or "completions"
    stream: bool
    cancel_after: int  # chunks read before the client goes away; 0: the whole answer
    prompt_words: int
    max_tokens: int
    temperature: float

    def body(self) -> dict:
        rng = random.Random(self.index)
        text = " ".join(rng.choice(WORDS) for _ in range(self.prompt_words))
        body = {"max_tokens": self.max_tokens, "stream": self.stream,
                "temperature": self.temperature, "seed": self.index}
        if self.api == "chat":
            return body | {"messages": [{"role": "user", "content": f"Write about {text}"}]}
        return body | {"prompt": f"Once upon a time, {text}"}


@dataclass
class Outcome:
    phase: str
    ask: Ask
    status: str  # "ok", "cancelled", "refused" (429) or "failed"
    latency_s: float
    first_s: float | None = None  # streams: time to the first text chunk
    error: str = ""


def plan_asks(n: int, seed: int, first_index: int = 0) -> list[Ask]:
    rng = random.Random(seed)
    asks = []
    for i in range(first_index, first_index + n):
        cancel = rng.random() < CANCEL_SHARE
        asks.append(Ask(
            index=i, api=rng.choice(("chat", "completions")),
            stream=cancel or rng.random() < 0.5, cancel_after=rng.randint(1, 4) if cancel else 0,
            prompt_words=_pick(rng, PROMPT_WORDS),
            max_tokens=64 if cancel else _pick(rng, MAX_TOKENS),
            temperature=rng.choice((0.0, 0.7))))
    return asks


def _pick(rng: random.Random, table: tuple[tuple[int, float], ...]) -> int:
    return rng.choices([v for v, _ in table], weights=[w for _, w in table])[0]


# --- one request ------------------------------------------------------------------------

def send(client: httpx.Client, base: str, ask: Ask, phase: str) -> Outcome:
    url = f"{base}/v1/{'chat/completions' if ask.api == 'chat' else 'completions'}"
    t0 = time.perf_counter()
    try:
        if ask.stream:
            status, first, error = _stream(client, url, ask, t0)
        else:
            status, first, error = _whole(client, url, ask), None, ""
            status, error = (status, "") if status in ("ok", "refused") else ("failed", status)
    except httpx.HTTPError as exc:
        status, first, error = "failed", None, f"{type(exc).__name__}: {exc}"
    return Outcome(phase, ask, status, time.perf_counter() - t0, first, error)


def _whole(client: httpx.Client, url: str, ask: Ask) -> str:
    r = client.post(url, json=ask.body())
    if r.status_code == 429:
        return "refused"
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:200]}"
    choice = r.json()["choices"][0]
    if choice.get("finish_reason") not in ("stop", "length"):
        return f"no finish_reason: {choice}"
    return "ok"


def _stream(client: httpx.Client, url: str, ask: Ask, t0: float
            ) -> tuple[str, float | None, str]:
    chunks, first, finished = 0, None, False
    with client.stream("POST", url, json=ask.body()) as r:
        if r.status_code == 429:
            r.read()
            return "refused", None, ""
        if r.status_code != 200:
            return "failed", None, f"HTTP {r.status_code}: {r.read()[:200]!r}"
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return ("ok", first, "") if finished else \
                    ("failed", first, "[DONE] without a finish_reason")
            payload = json.loads(data)
            if "error" in payload:
                return "failed", first, f"error in the stream: {payload['error']}"
            choice = payload["choices"][0]
            finished = finished or choice.get("finish_reason") is not None
            if choice.get("text") or choice.get("delta", {}).get("content"):
                chunks += 1
                first = first if first is not None else time.perf_counter() - t0
                if ask.cancel_after and chunks >= ask.cancel_after:
                    return "cancelled", first, ""  # leaving the block closes the connection
    return "failed", first, "the stream ended without [DONE]"


# --- phases -----------------------------------------------------------------------------

class Runner:
    """Sends asks from ``concurrency`` client threads; counts and marks as they finish."""

    def __init__(self, base: str, watch: ProcWatch, mark_every: int, timeout_s: float,
                 log) -> None:
        self.base, self.watch, self.mark_every = base, watch, mark_every
        self.timeout = httpx.Timeout(timeout_s, connect=10.0)
        self.outcomes: list[Outcome] = []
        self.counted = 0  # requests of the measured phases finished
        self._lock = threading.Lock()
        self.log = log

    def run(self, asks: list[Ask], phase: str, concurrency: int, counted: bool) -> None:
        todo: queue.Queue[Ask] = queue.Queue()
        for ask in asks:
            todo.put(ask)
        threads = [threading.Thread(target=self._client, args=(todo, phase, counted),
                                    name=f"client-{i}") for i in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _client(self, todo: queue.Queue[Ask], phase: str, counted: bool) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while True:
                try:
                    ask = todo.get_nowait()
                except queue.Empty:
                    return
                self._record(send(client, self.base, ask, phase), counted)

    def _record(self, outcome: Outcome, counted: bool) -> None:
        with self._lock:
            self.outcomes.append(outcome)
            if not counted:
                return
            self.counted += 1
            self.watch.done = n = self.counted
        if outcome.status == "failed":
            self.log(f"[red]request {outcome.ask.index} failed:[/] {escape(outcome.error)}")
        if n % self.mark_every == 0:
            self.watch.mark(f"{n} requests")
            self.log(f"{n} requests done")


# --- the server -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(model: Path, workdir: Path, args: argparse.Namespace, port: int
                ) -> tuple[subprocess.Popen, Path]:
    env = {k: v for k, v in os.environ.items() if k != "ORCH_API_KEY"}
    env |= {"ORCH_CACHE_DIR": str(workdir / "cache"), "ORCH_DISCOVERY": "off"}
    cmd = [sys.executable, "-m", "orchestrator.cli", "serve", str(model),
           "--local", str(args.workers), "--threads", str(args.threads),
           "--max-sessions", str(args.max_sessions), "--queue", str(args.queue),
           "--port", str(port)]
    log_path = workdir / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log)
    return proc, log_path


def await_serving(proc: subprocess.Popen, base: str, log_path: Path, deadline_s: float
                  ) -> None:
    give_up = time.monotonic() + deadline_s
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            raise SystemExit(f"orch serve exited with {proc.returncode}:\n"
                             f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"orch serve did not answer within {deadline_s:.0f} s")


def process_names(serve_pid: int, n_workers: int) -> dict[str, int]:
    """The serve process and its worker children, named by their cache folder's index."""
    pids = {"serve": serve_pid}
    for pid in children(serve_pid):
        argv = cmdline(pid)
        if "worker" in argv and "--cache-dir" in argv:
            folder = Path(argv[argv.index("--cache-dir") + 1]).name  # worker-<i>
            pids[f"worker {folder.removeprefix('worker-')}"] = pid
    if len(pids) != n_workers + 1:
        raise SystemExit(f"found {len(pids) - 1} worker processes under orch serve, "
                         f"expected {n_workers}")
    return dict(sorted(pids.items(), key=lambda kv: (kv[0] != "serve", kv[0])))


def stop_serve(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # uvicorn stops, then the workers are stopped
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the report -------------------------------------------------------------------------

def growth(marks: list[Snapshot], names: list[str]) -> dict[str, dict]:
    base = next(s for s in marks if s.label == "after warm-up")
    end = marks[-1]
    out = {}
    for name in names:
        a, b = base.procs[name], end.procs[name]
        if a is None or b is None:
            out[name] = {"gone": True}
            continue
        out[name] = {"rss_mib": [a.rss_kib / 1024, b.rss_kib / 1024],
                     "rss_growth": (b.rss_kib - a.rss_kib) / a.rss_kib,
                     "anon_mib": [a.anon_kib / 1024, b.anon_kib / 1024],
                     "file_mib": [a.file_kib / 1024, b.file_kib / 1024],
                     "fds": [a.fds, b.fds], "threads": [a.threads, b.threads]}
    return out


def _span(mib: list[float]) -> str:
    return f"{mib[0]:.1f} -> {mib[1]:.1f} ({mib[1] - mib[0]:+.1f})"


def phase_summary(outcomes: list[Outcome], phase: str) -> dict:
    mine = [o for o in outcomes if o.phase == phase]
    count = {s: sum(o.status == s for o in mine) for s in ("ok", "cancelled", "refused",
                                                           "failed")}
    ok = sorted(o.latency_s for o in mine if o.status == "ok")
    firsts = sorted(o.first_s for o in mine if o.first_s is not None and o.status == "ok")
    return {"requests": len(mine), **count, "latency_s": _percentiles(ok),
            "first_chunk_s": _percentiles(firsts)}


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    pick = {"p50": 0.50, "p90": 0.90, "p99": 0.99}
    out = {k: values[min(len(values) - 1, int(q * len(values)))] for k, q in pick.items()}
    return out | {"max": values[-1]}


def print_report(out, watch: ProcWatch, names: list[str], grown: dict, phases: dict,
                 failures: list[Outcome], idle: dict) -> None:
    over = Table(title="RSS MiB / open fds / threads, per process")
    for col in ("point", "t (s)", "requests", *names):
        over.add_column(col, justify="left" if col == "point" else "right")
    for snap in watch.marked():
        cells = [f"{p.rss_kib / 1024:.1f} / {p.fds} / {p.threads}" if p else "gone"
                 for p in (snap.procs[n] for n in names)]
        over.add_row(snap.label, f"{snap.t_s:.0f}", str(snap.done), *cells)
    out.print(over)
    grow = Table(title=f"From after the warm-up to the end (target: RSS growth under "
                       f"{RSS_TARGET:.0%})")
    for col in ("process", "RSS MiB", "growth", "anonymous MiB", "file-backed MiB",
                "open fds", "threads", "target"):
        grow.add_column(col, justify="left" if col == "process" else "right")
    for name in names:
        g = grown[name]
        if g.get("gone"):
            grow.add_row(name, "gone", "", "", "", "", "", "[red]missed[/]")
            continue
        met = g["rss_growth"] < RSS_TARGET
        grow.add_row(name, f"{g['rss_mib'][0]:.1f} -> {g['rss_mib'][1]:.1f}",
                     f"{g['rss_growth']:+.2%}", _span(g["anon_mib"]), _span(g["file_mib"]),
                     f"{g['fds'][0]} -> {g['fds'][1]}",
                     f"{g['threads'][0]} -> {g['threads'][1]}",
                     "met" if met else "[red]missed[/]")
    out.print(grow)
    lat = Table(title="Requests per phase (latency of the answers read whole, seconds)")
    for col in ("phase", "requests", "ok", "cancelled", "429", "failed", "p50", "p90",
                "p99", "max", "first chunk p50"):
        lat.add_column(col, justify="left" if col == "phase" else "right")
    for phase, s in phases.items():
        q = s["latency_s"]
        lat.add_row(phase, str(s["requests"]), str(s["ok"]), str(s["cancelled"]),
                    str(s["refused"]), str(s["failed"]),
                    *(f"{q[k]:.2f}" if q else "-" for k in ("p50", "p90", "p99", "max")),
                    f"{s['first_chunk_s']['p50']:.2f}" if s["first_chunk_s"] else "-")
    out.print(lat)
    for f in failures[:10]:
        out.print(f"[red]failed[/] #{f.ask.index} ({f.phase}, {f.ask.api}, "
                  f"{'stream' if f.ask.stream else 'whole'}): {escape(f.error)}", highlight=False)
    out.print(f"in flight at the end (server's count): {idle}", highlight=False)


# --- main -------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000, help="measured requests, in all")
    ap.add_argument("--concurrency", type=int, default=4, help="clients of the second half")
    ap.add_argument("--workers", type=int, default=2, help="local worker processes")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads per worker")
    ap.add_argument("--max-sessions", type=int, default=2)
    ap.add_argument("--queue", type=int, default=16,
                    help="orch serve --queue: requests that may wait (more get 429)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="requests before the baseline (default: 2%% of --requests, 4-20)")
    ap.add_argument("--sample-s", type=float, default=2.0, help="seconds between samples")
    ap.add_argument("--timeout-s", type=float, default=300.0,
                    help="a request with no answer for this long has failed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true",
                    help="print the results as JSON (the tables go to stderr)")
    ap.add_argument("--workdir", default=None, help="kept afterwards: cache, serve.log")
    args = ap.parse_args()
    if args.requests < 2 or args.concurrency < 1 or args.workers < 1:
        ap.error("--requests >= 2, --concurrency >= 1, --workers >= 1")
    if args.warmup is None:
        args.warmup = max(4, min(20, args.requests // 50))
    return args


def main() -> None:
    args = parse_args()
    out = Console(stderr=True, width=160) if args.json else console()  # JSON alone on stdout
    print_header(out, f"Soak: {args.requests} requests through orch serve")
    from orchestrator.models.store import resolve_model

    model = resolve_model(REAL, progress=False)
    with work_directory(args.workdir) as workdir:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc, log_path = start_serve(model, workdir, args, port)
        try:
            await_serving(proc, base, log_path, deadline_s=300)
            result = soak(args, base, process_names(proc.pid, args.workers), out)
        finally:
            stop_serve(proc)
        result["serve_exit_code"] = proc.returncode
    out.print(f"orch serve exited with {proc.returncode}")
    if args.json:
        print(json.dumps(result, indent=1))


def soak(args: argparse.Namespace, base: str, pids: dict[str, int], out: Console) -> dict:
    names = list(pids)
    watch = ProcWatch(pids, args.sample_s)
    log = out.print
    runner = Runner(base, watch, max(1, args.requests // 10), args.timeout_s, log)
    watch.mark("start")
    watch.start()
    warm = plan_asks(args.warmup, args.seed + 1, first_index=10**6)
    runner.run(warm, "warm-up", args.concurrency, counted=False)
    watch.mark("after warm-up")
    asks = plan_asks(args.requests, args.seed)
    half = args.requests // 2
    log(f"warm-up done; {half} sequential requests, then {args.requests - half} from "
        f"{args.concurrency} clients")
    runner.run(asks[:half], "sequential", 1, counted=True)
    runner.run(asks[half:], f"{args.concurrency} concurrent", args.concurrency, counted=True)
    time.sleep(max(2.0, args.sample_s))  # cancelled answers end their sessions
    idle = httpx.get(f"{base}/api/cluster", timeout=10).json()["sessions"]
    watch.mark("end")
    watch.stop()
    marks = watch.marked()
    grown = growth(marks, names)
    phases = {p: phase_summary(runner.outcomes, p)
              for p in ("warm-up", "sequential", f"{args.concurrency} concurrent")}
    failures = [o for o in runner.outcomes if o.status == "failed"]
    print_report(out, watch, names, grown, phases, failures, idle)
    return {"machine": machine_facts(), "args": vars(args), "pids": pids, "growth": grown,
            "rss_target": RSS_TARGET, "phases": phases, "in_flight_at_end": idle,
            "failures": [asdict(f) for f in failures],
            "snapshots": [s.to_json() for s in watch.snapshots]}


if __name__ == "__main__":
    main()
