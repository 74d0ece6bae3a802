"""``orch verify``: prove on this machine that a split model equals the unsplit one.

The model runs whole in one engine and as a chain of shards in others (same process, no
network), over a prompt and then greedy decode steps; every step's logits are compared
bit for bit.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchcore.codecs import get_codec
from orchcore.embedrows import RowTable
from orchcore.engine import EngineConfig, StageEngine, Step
from orchcore.facts import TOKEN_EMBD, read_model_facts
from orchcore.shard import LayerRange, even_ranges, write_shard


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


class LocalChain:
    """A chain of stage engines in this process: the split model, without sockets.

    Hidden states cross every hop encoded and decoded with ``codec``, exactly as between
    workers (f32 is a plain copy). With tied embeddings the first stage takes each token's
    row from the model file, as the orchestrator sends it.
    """

    def __init__(self, model: Path, ranges: Sequence[LayerRange], workdir: Path,
                 config: EngineConfig, codec: str = "f32") -> None:
        facts = read_model_facts(model)
        self.codec = get_codec(codec)
        self.ranges = tuple(ranges)
        self.stages: list[StageEngine] = []
        self.rows: RowTable | None = None
        try:
            for r in self.ranges:
                shard = write_shard(model, r, workdir / f"shard-{r.start}-{r.end}.gguf",
                                    facts=facts)
                self.stages.append(StageEngine(shard.path, config))
            if self.stages[0].takes_rows:
                embd = facts.by_name[TOKEN_EMBD]
                self.rows = RowTable.of_tensor(facts.parts[embd.part], embd)
        except BaseException:
            self.close()
            raise

    def forward(self, session: str, positions: Sequence[int], tokens: Sequence[int],
                all_logits: bool = False) -> np.ndarray:
        return self._through([Step(session, np.asarray(positions, dtype=np.int32))],
                             list(tokens), all_logits)

    def forward_batch(self, steps: Sequence[tuple[str, int, int]]) -> np.ndarray:
        """One decode step of each of several sessions, in one batch on every stage:
        ``steps`` is (session, position, token); the logits of each, in order."""
        return self._through([Step(session, np.array([pos], np.int32))
                              for session, pos, _ in steps], [tok for *_, tok in steps])

    def _through(self, steps: list[Step], tokens: list[int], all_logits: bool = False
                 ) -> np.ndarray:
        rows = self.rows.take(tokens) if self.rows is not None else None
        out = self.stages[0].forward_batch(steps, tokens=tokens, rows=rows,
                                           all_logits=all_logits)
        for stage in self.stages[1:]:
            out = self.codec.decode(self.codec.encode(out), *out.shape)
            out = stage.forward_batch(steps, hidden=out, all_logits=all_logits)
        return out

    def end_session(self, session: str) -> None:
        for stage in self.stages:
            stage.end_session(session)

    def close(self) -> None:
        for stage in self.stages:
            stage.close()
        if self.rows is not None:
            self.rows.close()


def verify_split(model: Path, prompt: list[int], n_stages: int, decode_steps: int = 32,
                 threads: int = 0) -> VerifyResult:
    facts = read_model_facts(model)
    facts.require_supported()
    ranges = even_ranges(facts.n_layers, n_stages)
    config = EngineConfig(context_tokens=len(prompt) + decode_steps + 8, max_sessions=1,
                          batch_tokens=max(len(prompt), 1), threads=threads)
    with tempfile.TemporaryDirectory(prefix="orch-verify-") as tmp:
        chain = LocalChain(model, ranges, Path(tmp), config)
        try:
            whole = StageEngine(model, config)
            try:
                return _compare(whole, chain, prompt, decode_steps)
            finally:
                whole.close()
        finally:
            chain.close()


def _compare(whole: StageEngine, chain: LocalChain, prompt: list[int], steps: int
             ) -> VerifyResult:
    positions = list(range(len(prompt)))
    a = whole.forward("v", positions, tokens=prompt)
    b = chain.forward("v", positions, prompt)
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
        b = chain.forward("v", pos, [tok_a[-1]])  # same input to both: every step compares
    return VerifyResult(chain.ranges, steps + 1, same, worst, tuple(tok_a), tuple(tok_b))
