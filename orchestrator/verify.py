"""``orch verify``: prove on this machine that a split model equals the unsplit one.

The model runs whole in one engine and as a chain of shards in others (same process, no
network), over a prompt and then greedy decode steps; every step's logits are compared
bit for bit.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.facts import read_model_facts
from orchestrator.shard import LayerRange, even_ranges, write_shard
from worker.engine import EngineConfig, StageEngine


@dataclass(frozen=True)
class VerifyResult:
    ranges: tuple[LayerRange, ...]
    steps: int
    identical_steps: int
    max_abs_diff: float
    tokens_whole: tuple[int, ...]
    tokens_split: tuple[int, ...]

    @property
    def exact(self) -> bool:
        return self.identical_steps == self.steps


def verify_split(model: Path, prompt: list[int], n_stages: int, decode_steps: int = 32,
                 threads: int = 0) -> VerifyResult:
    facts = read_model_facts(model)
    facts.require_supported()
    ranges = even_ranges(facts.n_layers, n_stages)
    config = EngineConfig(context_tokens=len(prompt) + decode_steps + 8, max_sessions=1,
                          batch_tokens=max(len(prompt), 1), threads=threads)
    with tempfile.TemporaryDirectory(prefix="orch-verify-") as tmp:
        shards = [write_shard(model, r, Path(tmp) / f"{r.start}-{r.end}.gguf", facts=facts).path
                  for r in ranges]
        whole = StageEngine(model, config)
        chain = [StageEngine(p, config) for p in shards]
        try:
            return _compare(whole, chain, ranges, prompt, decode_steps)
        finally:
            for engine in [whole, *chain]:
                engine.close()


def _compare(whole: StageEngine, chain: list[StageEngine], ranges: tuple[LayerRange, ...],
             prompt: list[int], steps: int) -> VerifyResult:
    def run_chain(positions: list[int], tokens: list[int]) -> np.ndarray:
        out = chain[0].forward("v", positions, tokens=tokens)
        for stage in chain[1:]:
            out = stage.forward("v", positions, hidden=out)
        return out

    positions = list(range(len(prompt)))
    a = whole.forward("v", positions, tokens=prompt)
    b = run_chain(positions, prompt)
    same, worst = 0, 0.0
    tok_a: list[int] = []
    tok_b: list[int] = []
    for step in range(steps + 1):
        same += int(np.array_equal(a, b))
        worst = max(worst, float(np.abs(a - b).max()))
        tok_a.append(int(a[-1].argmax()))
        tok_b.append(int(b[-1].argmax()))
        if step == steps:
            break
        pos = [len(prompt) + step]
        a = whole.forward("v", pos, tokens=[tok_a[-1]])
        b = run_chain(pos, [tok_a[-1]])  # same input to both, so every step is comparable
    return VerifyResult(ranges, steps + 1, same, worst, tuple(tok_a), tuple(tok_b))
