"""How closely the split model follows the unsplit one with each hidden-state codec.

    python bench/codec_agreement.py --tokens 256

For each codec and prompt: greedy decoding of ``--tokens`` tokens by the unsplit model
(llama-cpp-python in this process) and by a 2-stage chain whose hidden states cross the cut
encoded and decoded with the codec (the same functions the workers use on the wire);
reported are the first position where the two texts differ and the share of identical
tokens. Then, teacher-forced over the unsplit model's own text, the mean KL divergence of
next-token distributions (both evaluated in the same batch shape, so only the codec
differs).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _common import console, get_model, print_header
from rich.table import Table

from orchcore.engine import EngineConfig
from orchcore.facts import read_model_facts
from testkit.chain import Chain
from testkit.reference import ReferenceModel, kl_per_row

PROMPTS = (
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle stays upright.",
    "List five uses of a paperclip.",
)



def greedy_chain(chain: Chain, prompt: list[int], n: int, session: str) -> list[int]:
    logits = chain.forward(session, range(len(prompt)), prompt)
    out = [int(logits[-1].argmax())]
    for i in range(n - 1):
        logits = chain.forward(session, [len(prompt) + i], [out[-1]])
        out.append(int(logits[-1].argmax()))
    chain.end_session(session)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cut", type=int, default=15)
    ap.add_argument("--codecs", default="f32,f16,q8_0")
    args = ap.parse_args()
    out = console()
    print_header(out, "Hidden-state codec fidelity")
    with tempfile.TemporaryDirectory() as tmp:
        model = get_model("135m", Path(tmp))
        facts = read_model_facts(model.path)
        ctx = 64 + args.tokens + 16
        ref = ReferenceModel(model.path, n_ctx=ctx * 2, threads=args.threads)
        runs = []
        for text in PROMPTS:
            prompt = ref.tokenize(text)
            ref_tokens, _ = ref.greedy(prompt, args.tokens)
            ref.close()
            ref = ReferenceModel(model.path, n_ctx=ctx * 2, threads=args.threads)
            seq = prompt + ref_tokens
            runs.append((prompt, ref_tokens, seq, ref.eval(seq)))
            ref.close()
            ref = ReferenceModel(model.path, n_ctx=ctx * 2, threads=args.threads)
        ref.close()
        table = Table(title=f"{model.label}, cut at layer {args.cut} of {facts.n_layers}, "
                            f"{args.tokens} greedy tokens per prompt")
        for col in ("codec", "bytes/token/hop", "first divergence", "identical tokens",
                    "mean KL (nats)", "top-1 agreement"):
            table.add_column(col, justify="right")
        for codec in args.codecs.split(","):
            (Path(tmp) / codec).mkdir()
            chain = Chain(model.path, [args.cut], Path(tmp) / codec,
                          EngineConfig(threads=args.threads, context_tokens=ctx * 2,
                                       max_sessions=1, batch_tokens=ctx * 2), codec=codec)
            firsts, shares, kls, top1s = [], [], [], []
            for i, (prompt, ref_tokens, seq, ref_logits) in enumerate(runs):
                got = greedy_chain(chain, prompt, args.tokens, f"g{i}")
                same = [a == b for a, b in zip(got, ref_tokens, strict=True)]
                firsts.append(same.index(False) if False in same else len(same))
                shares.append(float(np.mean(same)))
                logits = chain.forward(f"t{i}", range(len(seq)), seq, all_logits=True)
                chain.end_session(f"t{i}")
                kls.append(float(kl_per_row(ref_logits, logits).mean()))
                top1s.append(float(np.mean(ref_logits.argmax(-1) == logits.argmax(-1))))
            chain.close()
            row_bytes = chain.codec.encoded_size(1, facts.n_embd)
            table.add_row(codec, str(row_bytes), " / ".join(map(str, firsts)),
                          " / ".join(f"{s:.2f}" for s in shares),
                          " / ".join(f"{k:.1e}" for k in kls),
                          " / ".join(f"{t:.3f}" for t in top1s))
        out.print(table)
        out.print("Values per prompt, in order: " + " | ".join(PROMPTS))


if __name__ == "__main__":
    main()
