"""How far a session's greedy answer moves when its decode steps share batches with others.

    python bench/batch_drift.py --tokens 128 --sessions 4

Each prompt's greedy answer is decoded twice by the same 2-stage chain (f32 between the
stages): alone, then with ``--sessions`` sessions decoding together, every step one
``llama_decode`` of all of them (as stage 0 batches them). Reported per prompt: the first
position where the two answers differ and the share of identical tokens; then, with the
batched answer's tokens forced on the lone session too, the mean and largest KL divergence
between the two next-token distributions and how often their top tokens agree.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _common import console, get_model, print_header, work_directory
from rich.table import Table

from orchcore.engine import EngineConfig
from orchcore.facts import read_model_facts
from orchestrator.text.tokenizer import Tokenizer
from testkit.chain import Chain
from testkit.reference import kl_per_row

PROMPTS = (
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle stays upright.",
    "List five uses of a paperclip.",
    "What is the capital of France, and why?",
    "Describe a sunrise over the sea.",
    "How do bees make honey?",
    "Give three tips for learning a language.",
    "Why is the sky blue?",
)



def batched(chain: Chain, prompts: list[list[int]], n: int) -> tuple[list[list[int]],
                                                                     list[list[np.ndarray]]]:
    """Every session's greedy tokens and logits, its decode steps all in one batch."""
    tokens, logits = [], []
    for i, prompt in enumerate(prompts):
        first = chain.forward(f"b{i}", range(len(prompt)), prompt)[-1]
        tokens.append([int(first.argmax())])
        logits.append([first])
    for step in range(n - 1):
        rows = chain.forward_batch([(f"b{i}", len(p) + step, tokens[i][-1])
                                    for i, p in enumerate(prompts)])
        for i, row in enumerate(rows):
            tokens[i].append(int(row.argmax()))
            logits[i].append(row)
    for i in range(len(prompts)):
        chain.end_session(f"b{i}")
    return tokens, logits


def alone(chain: Chain, prompt: list[int], forced: list[int]) -> tuple[list[int],
                                                                        list[np.ndarray]]:
    """Greedy tokens of ``prompt`` decoded alone, and the logits with ``forced`` fed."""
    greedy, logits = [], []
    for session, feed in (("g", None), ("f", forced)):
        out = chain.forward(session, range(len(prompt)), prompt)[-1]
        picks, rows = [int(out.argmax())], [out]
        for step in range(len(forced) - 1):
            fed = picks[-1] if feed is None else feed[step]
            out = chain.forward(session, [len(prompt) + step], [fed])[-1]
            picks.append(int(out.argmax()))
            rows.append(out)
        chain.end_session(session)
        if feed is None:
            greedy = picks
        else:
            logits = rows
    return greedy, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="135m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="kept afterwards (generated model)")
    args = ap.parse_args()
    out = console()
    print_header(out, "A session's greedy answer, batched with others against alone")
    with work_directory(args.workdir) as workdir, \
            tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        for key in args.models.split(","):
            model = get_model(key, workdir)
            n_layers = read_model_facts(model.path).n_layers
            with Tokenizer.from_gguf(model.path) as tok:
                prompts = [tok.encode(p) for p in PROMPTS[:args.sessions]]
            context = max(map(len, prompts)) + args.tokens + 8
            chain = Chain(model.path, [n_layers // 2], Path(tmp), EngineConfig(
                threads=args.threads, context_tokens=context, max_sessions=args.sessions,
                batch_tokens=max(map(len, prompts))))
            try:
                tokens, logits = batched(chain, prompts, args.tokens)
                table = Table(title=f"{model.label}: {args.sessions} sessions batched vs "
                                    f"alone, {args.tokens} greedy tokens each")
                for col in ("prompt", "first difference", "identical tokens",
                            "mean KL (nats)", "max KL (nats)", "top-1 agreement"):
                    table.add_column(col, justify="left" if col == "prompt" else "right")
                for i, prompt in enumerate(prompts):
                    greedy, lone = alone(chain, prompt, tokens[i])
                    same = [a == b for a, b in zip(greedy, tokens[i], strict=True)]
                    first = same.index(False) if False in same else None
                    lone_rows, batched_rows = np.stack(lone), np.stack(logits[i])
                    kl = kl_per_row(lone_rows, batched_rows)
                    agree = float(np.mean(lone_rows.argmax(-1) == batched_rows.argmax(-1)))
                    table.add_row(PROMPTS[i][:40], "none" if first is None else str(first),
                                  f"{np.mean(same):.2f}", f"{kl.mean():.1e}",
                                  f"{kl.max():.1e}", f"{agree:.3f}")
            finally:
                chain.close()
            out.print(table)


if __name__ == "__main__":
    main()
