"""The product's in-process chain (``orchestrator.verify.LocalChain``), cut by layer
boundaries, and a replay helper for exactness tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from orchcore.engine import EngineConfig
from orchcore.facts import read_model_facts
from orchcore.shard import ranges_from_cuts
from orchestrator.verify import LocalChain


class Chain(LocalChain):
    """``LocalChain`` cut at explicit layer boundaries: ``Chain(model, [10, 20], ...)``."""

    def __init__(self, model: Path, cuts: Sequence[int], workdir: Path,
                 config: EngineConfig, codec: str = "f32") -> None:
        n_layers = read_model_facts(model).n_layers
        super().__init__(model, ranges_from_cuts(n_layers, cuts), workdir, config, codec)


def replay(chain: Chain, prompt: list[int], generated: list[int],
           session: str = "s") -> list[np.ndarray]:
    """Feed the reference's prompt and greedy tokens; return logits in the same layout."""
    out = [chain.forward(session, range(len(prompt)), prompt, all_logits=True)]
    pos = len(prompt)
    for tok in generated:
        out.append(chain.forward(session, [pos], [tok]))
        pos += 1
    return out
