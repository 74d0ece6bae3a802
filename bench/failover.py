"""Time from a worker's death to the next token, by model size and position in the answer.

    .venv/bin/python bench/failover.py --models 135m,1b --positions 4,64

Real ``orch worker`` processes on loopback: 3 stages and 1 standby, 1 thread each. For each
model, position and victim stage, an answer (greedy) is started; after ``position`` tokens
the victim is killed (SIGKILL), and the time to the next token is measured. The answer is
checked against the uninterrupted one. What the gap is made of: noticing the death,
planning again, writing and sending the lost stage's shard to the standby (survivors keep
theirs), loading it, and replaying the session (prompt in its chunks, then each generated
token), which grows with the position.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from _common import console, get_model, parse_models, print_header, work_directory
from rich.table import Table

from orchcore.facts import read_model_facts
from orchcore.sampling import SamplingParams
from orchestrator.cluster.local import LocalCluster
from orchestrator.pipeline.connected import Cluster
from orchestrator.pipeline.session import Failover
from orchestrator.planning.plan import make_plan
from orchestrator.settings import OrchSettings
from orchestrator.text.tokenizer import Tokenizer

PROMPT = "The capital of France is Paris. The capital of Germany is"
GREEDY = SamplingParams(temperature=0.0)
STAGES = 3


def one_answer(model, prompt: list[int], n: int, kill: tuple[int, int] | None
               ) -> tuple[list[int], float, str]:
    """The answer's tokens; with ``kill`` (pid, after k tokens), the gap and the notice."""
    stream = model.steps(model.new_session(GREEDY), prompt, n)
    tokens, gap, sent, notice = [], 0.0, None, ""
    for item in stream:
        if isinstance(item, Failover):
            notice = item.describe()
            continue
        tokens.append(item)
        if sent is not None and not gap:
            gap = time.monotonic() - sent
        if kill is not None and sent is None and len(tokens) == kill[1]:
            os.kill(kill[0], signal.SIGKILL)
            sent = time.monotonic()
    return tokens, gap, notice


def measure(path: Path, position: int, victim: int, workdir: Path) -> dict:
    settings = OrchSettings.load(context_tokens=1024, lease_renew_s=1)
    facts = read_model_facts(path)
    answer_len = position + 8
    with LocalCluster(STAGES + 1, workdir / f"w-{position}-{victim}",
                      threads_per_worker=1) as cluster, Tokenizer.from_gguf(path) as tok:
        connected = Cluster.connect(cluster.addresses, cluster.token, settings,
                                    cluster.check_alive)
        options = settings.plan_options(use_all=True)
        plan = make_plan(facts, connected.devices[:STAGES], options)
        prompt = tok.encode(PROMPT)
        try:
            with connected.open(plan, facts, tok, options=options,
                                failover=True) as model:
                want, _, _ = one_answer(model, prompt, answer_len, None)
                address = model.plan.stages[victim].worker
                pid = cluster.procs[cluster.addresses.index(address)].pid
                got, gap, notice = one_answer(model, prompt, answer_len, (pid, position))
        finally:
            connected.close()
    return {"position": position, "victim": victim, "gap_s": gap, "same": got == want,
            "notice": notice}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="135m", help="comma-separated: 135m, 1b")
    ap.add_argument("--positions", default="4,64",
                    help="tokens into the answer when the worker dies")
    ap.add_argument("--victims", default="0,2", help="stages to kill (0 = first)")
    ap.add_argument("--workdir", help="keep generated models here (reused)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = console()
    if not args.json:
        print_header(out, "failover: death to next token")
    rows = []
    with work_directory(args.workdir) as workdir:
        for key in parse_models(args.models):
            model = get_model(key, workdir)
            for position in (int(p) for p in args.positions.split(",")):
                for victim in (int(v) for v in args.victims.split(",")):
                    row = {"model": model.label,
                           **measure(model.path, position, victim, workdir)}
                    rows.append(row)
                    if not args.json:
                        out.print(f"  {key} position {position} stage {victim}: "
                                  f"{row['gap_s']:.2f} s, same answer: {row['same']}")
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("model", "killed after", "stage", "death -> next token", "answer unchanged")
    for r in rows:
        table.add_row(r["model"], f"{r['position']} tokens", str(r["victim"]),
                      f"{r['gap_s']:.2f} s", "yes" if r["same"] else "NO")
    out.print(table)


if __name__ == "__main__":
    main()
