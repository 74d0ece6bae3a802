"""A mixed x86 + arm64 pipeline against the unsplit x86 model: how close, not how fast.

Exactness is promised against the unsplit model on the same CPU kind. A stage on another
kind runs other ggml kernels (NEON with repacked weights instead of AVX-512), so its
float results differ in the last bits and the difference grows through the layers. This
measures it, teacher-forced so every variant sees the same tokens: for each prompt the
unsplit x86 model runs the prompt (logits of every row) and greedy decode steps; every
other variant replays those tokens with the same batch shapes.

Variants, each against the unsplit x86 model (``x86``):
  ``x86 → arm64``    stage 0 on x86, stage 1 on arm64 (f32 hidden states between them);
  ``arm64 → x86``    the other way round;
  ``arm64 (unsplit)`` the whole model on arm64;
  ``arm64 → arm64``  both stages on arm64 (against the unsplit arm64 model: exact).

Three steps share a work folder that both machines see (run.sh runs them):

    python bench/arm64/mixed.py x86-first DIR     # host: tokens, x86 logits, stage-0 hidden
    python bench/arm64/mixed.py arm64 DIR         # rootfs: arm64 stage 1, whole, stage 0
    python bench/arm64/mixed.py x86-second DIR    # host: x86 stage 1 on arm64 hidden; table
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from orchcore.engine import EngineConfig, StageEngine
from orchcore.facts import read_model_facts
from orchcore.shard import even_ranges, write_shard

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "Here is a short poem about the moon:",
    "The most important thing to remember when learning to cook is",
    "In 1969, the first humans",
)


def _engine(path: Path, threads: int) -> StageEngine:
    return StageEngine(path, EngineConfig(context_tokens=256, max_sessions=1,
                                          batch_tokens=128, threads=threads))


def _replay(engine: StageEngine, tokens: list[int], n_prompt: int,
            inputs: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Prompt as one chunk (every row's output), then one token per step; ``inputs``: the
    hidden states for each chunk (a stage after the first), else the token ids."""
    chunks = [range(n_prompt)] + [range(p, p + 1) for p in range(n_prompt, len(tokens))]
    out = []
    for i, rows in enumerate(chunks):
        if inputs is None:
            out.append(engine.forward("m", rows, tokens=tokens[rows.start:rows.stop],
                                      all_logits=True))
        else:
            out.append(engine.forward("m", rows, hidden=inputs[i], all_logits=True))
    engine.end_session("m")
    return out


def _save(path: Path, arrays: list[list[np.ndarray]]) -> None:
    """Per prompt, the chunks' outputs stacked into one [rows, width] array."""
    np.savez(path, *[np.concatenate(chunks) for chunks in arrays])


def _load_chunks(path: Path, n_prompts: list[int]) -> list[list[np.ndarray]]:
    """Back into chunks: the prompt's rows, then one row per step."""
    with np.load(path) as data:
        stacked = [data[f"arr_{i}"] for i in range(len(n_prompts))]
    return [[a[:n]] + [a[j:j + 1] for j in range(n, len(a))]
            for a, n in zip(stacked, n_prompts, strict=True)]


def _layout(workdir: Path) -> tuple[Path, list[Path]]:
    model = workdir / "model.gguf"
    shards = sorted(workdir.glob("shard-*.gguf"), key=lambda p: int(p.stem.split("-")[1]))
    return model, shards


def x86_first(workdir: Path, model_name: str, threads: int, n_prompts: int, steps: int
              ) -> None:
    from orchestrator.models.store import resolve_model
    from orchestrator.text.tokenizer import Tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    source = resolve_model(model_name, progress=False)
    model = workdir / "model.gguf"
    model.unlink(missing_ok=True)
    try:
        model.hardlink_to(source)
    except OSError:
        shutil.copyfile(source, model)
    facts = read_model_facts(model)
    for r in even_ranges(facts.n_layers, 2):
        write_shard(model, r, workdir / f"shard-{r.start}-{r.end}.gguf", facts=facts)
    _, shards = _layout(workdir)
    with Tokenizer.from_gguf(model) as tok:
        prompts = [tok.encode(p) for p in PROMPTS[:n_prompts]]
    tokens, logits = [], []
    with _engine(model, threads) as whole:
        for prompt in prompts:
            seq = list(prompt)
            out = [whole.forward("m", range(len(seq)), tokens=seq, all_logits=True)]
            for _ in range(steps):
                seq.append(int(np.argmax(out[-1][-1])))
                out.append(whole.forward("m", [len(seq) - 1], tokens=seq[-1:], all_logits=True))
            whole.end_session("m")
            tokens.append(seq)
            logits.append(out)
    n_prompts = [len(p) for p in prompts]
    np.savez(workdir / "tokens.npz", n_prompt=np.array(n_prompts),
             **{f"t{i}": np.array(t) for i, t in enumerate(tokens)})
    _save(workdir / "logits-x86.npz", logits)
    with _engine(shards[0], threads) as stage0:
        _save(workdir / "hidden-x86.npz",
              [_replay(stage0, t, n) for t, n in zip(tokens, n_prompts, strict=True)])


def _tokens(workdir: Path) -> tuple[list[list[int]], list[int]]:
    with np.load(workdir / "tokens.npz") as data:
        n_prompts = [int(n) for n in data["n_prompt"]]
        tokens = [[int(t) for t in data[f"t{i}"]] for i in range(len(n_prompts))]
    return tokens, n_prompts


def arm64(workdir: Path, threads: int) -> None:
    model, shards = _layout(workdir)
    tokens, n_prompts = _tokens(workdir)
    runs = list(zip(tokens, n_prompts, strict=True))
    with _engine(shards[1], threads) as stage1:
        hidden = _load_chunks(workdir / "hidden-x86.npz", n_prompts)
        _save(workdir / "logits-x86-arm64.npz",
              [_replay(stage1, t, n, h) for (t, n), h in zip(runs, hidden, strict=True)])
        with _engine(shards[0], threads) as stage0:
            own = [_replay(stage0, t, n) for t, n in runs]
        _save(workdir / "hidden-arm64.npz", own)
        _save(workdir / "logits-arm64-arm64.npz",
              [_replay(stage1, t, n, h) for (t, n), h in zip(runs, own, strict=True)])
    with _engine(model, threads) as whole:
        _save(workdir / "logits-arm64.npz", [_replay(whole, t, n) for t, n in runs])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> dict[str, float]:
    """Mean and max KL(ref || got) of the next-token distributions, greedy agreement,
    identical rows and the largest logit difference, over every row of every prompt."""
    a, b = np.concatenate(ref), np.concatenate(got)
    la, lb = _log_softmax(a), _log_softmax(b)
    kl = (np.exp(la) * (la - lb)).sum(axis=-1)
    return {"rows": len(a), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "agree": float((a.argmax(-1) == b.argmax(-1)).mean()),
            "identical": float((a == b).all(axis=-1).mean()),
            "max_abs": float(np.abs(a - b).max())}


def x86_second(workdir: Path, threads: int) -> None:
    _, shards = _layout(workdir)
    tokens, n_prompts = _tokens(workdir)
    runs = list(zip(tokens, n_prompts, strict=True))
    hidden = _load_chunks(workdir / "hidden-arm64.npz", n_prompts)
    with _engine(shards[1], threads) as stage1:
        _save(workdir / "logits-arm64-x86.npz",
              [_replay(stage1, t, n, h) for (t, n), h in zip(runs, hidden, strict=True)])

    def load(name: str) -> list[np.ndarray]:
        with np.load(workdir / f"logits-{name}.npz") as data:
            return [data[f"arr_{i}"] for i in range(len(runs))]

    x86 = load("x86")
    rows = [("x86 → arm64", "x86", compare(x86, load("x86-arm64"))),
            ("arm64 → x86", "x86", compare(x86, load("arm64-x86"))),
            ("arm64 (unsplit)", "x86", compare(x86, load("arm64"))),
            ("arm64 → arm64", "arm64", compare(load("arm64"), load("arm64-arm64")))]
    ranges = ", ".join(p.stem.removeprefix("shard-").replace("-", "..") for p in shards)
    steps = len(tokens[0]) - n_prompts[0]
    print(f"{len(runs)} prompts, {steps} greedy steps each (teacher-forced), "
          f"{rows[0][2]['rows']} next-token distributions; stages [{ranges}) "
          f"(half-open), f32 hidden states; llama.cpp threads: {threads}")
    print()
    print("| pipeline (stage 0 → stage 1) | against | mean KL (nats) | max KL (nats) "
          "| greedy agreement | identical rows | max abs logit diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, against, m in rows:
        print(f"| {name} | {against} unsplit | {m['kl_mean']:.2e} | {m['kl_max']:.2e} | "
              f"{m['agree']:.2%} | {m['identical']:.2%} | {m['max_abs']:.3g} |")
    exact = rows[3][2]
    if exact["identical"] != 1.0:
        sys.exit("arm64 | arm64 differs from the unsplit arm64 model: exactness broken")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=("x86-first", "arm64", "x86-second"))
    p.add_argument("workdir", type=Path)
    p.add_argument("--model", default="smollm2-135m", help="a known name or a .gguf path")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=4, choices=range(1, len(PROMPTS) + 1),
                   metavar=f"1..{len(PROMPTS)}", help="prompts to use (x86-first)")
    p.add_argument("--steps", type=int, default=24, help="greedy steps per prompt (x86-first)")
    args = p.parse_args(argv)
    if args.step == "x86-first":
        x86_first(args.workdir, args.model, args.threads, args.prompts, args.steps)
    elif args.step == "arm64":
        arm64(args.workdir, args.threads)
    else:
        x86_second(args.workdir, args.threads)


if __name__ == "__main__":
    main()
