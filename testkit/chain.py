"""The product's in-process chain (``orchestrator.pipeline.verify.LocalChain``), cut by layer
boundaries, and the replay and comparison the exactness tests share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from orchcore.engine import EngineConfig
from orchcore.facts import read_model_facts
from orchcore.shard import ranges_from_cuts
from orchestrator.pipeline.verify import LocalChain
from testkit.reference import ReferenceModel


class Chain(LocalChain):
    """``LocalChain`` cut at explicit layer boundaries: ``Chain(model, [10, 20], ...)``."""

    def __init__(self, model: Path, cuts: Sequence[int], workdir: Path,
                 config: EngineConfig, codec: str = "f32") -> None:
        n_layers = read_model_facts(model).n_layers
        super().__init__(model, ranges_from_cuts(n_layers, cuts), workdir, config, codec)

    def first(self, session: str, positions: Sequence[int], tokens: Sequence[int]
              ) -> np.ndarray:
        """Stage 0 alone on ``tokens``, with their embedding rows when it takes them."""
        rows = self.rows.take(list(tokens)) if self.rows is not None else None
        return self.stages[0].forward(session, positions, tokens=tokens, rows=rows)

    def rollback(self, session: str, length: int) -> None:
        """Drop ``session``'s positions from ``length`` onward on every stage."""
        for stage in self.stages:
            stage.rollback(session, length)


class ChainTarget:
    """One session of a ``Chain`` as the target of ``orchcore.speculation.decode``."""

    def __init__(self, chain: Chain, session: str = "target") -> None:
        self.chain, self.session = chain, session
        config = chain.stages[0].config
        self.context_tokens, self.batch_tokens = config.context_tokens, config.batch_tokens

    def forward(self, start: int, tokens: Sequence[int], all_rows: bool) -> np.ndarray:
        return self.chain.forward(self.session, range(start, start + len(tokens)), tokens,
                                  all_logits=all_rows)

    def rollback(self, length: int) -> None:
        self.chain.rollback(self.session, length)


def replay(chain: Chain, prompt: list[int], generated: list[int],
           session: str = "s") -> list[np.ndarray]:
    """Feed the reference's prompt and greedy tokens; return logits in the same layout."""
    out = [chain.forward(session, range(len(prompt)), prompt, all_logits=True)]
    pos = len(prompt)
    for tok in generated:
        out.append(chain.forward(session, [pos], [tok]))
        pos += 1
    return out


def assert_chain_exact(model: Path, cuts: Sequence[int], workdir: Path, threads: int,
                       prompt: list[int], generated: list[int],
                       expected: list[np.ndarray]) -> None:
    """``model`` cut at ``cuts`` replays ``prompt`` and ``generated`` with the unsplit
    model's logits (``expected``), bit for bit."""
    assert len(set(generated)) > 1 or np.ptp(expected[0]) > 0, "degenerate model"
    chain = Chain(model, cuts, workdir, EngineConfig(threads=threads, context_tokens=64,
                                                    max_sessions=1))
    try:
        got = replay(chain, prompt, generated)
    finally:
        chain.close()
    for step, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert np.array_equal(a, b), (cuts, step, float(np.abs(a - b).max()))


def assert_split_exact(model: Path, tmp_path: Path, threads: int,
                       cuts_list: Sequence[Sequence[int]], prompt: list[int],
                       steps: int) -> None:
    """The unsplit model's greedy run, then a chain at each of ``cuts_list`` replaying it."""
    ref = ReferenceModel(model, threads=threads)
    generated, expected = ref.greedy(prompt, steps)
    ref.close()
    for cuts in cuts_list:
        workdir = tmp_path / "-".join(map(str, cuts))
        workdir.mkdir()
        assert_chain_exact(model, cuts, workdir, threads, prompt, generated, expected)
