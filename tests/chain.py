"""An in-process chain of stage engines: the split model, without sockets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from orchestrator.codecs import get_codec
from orchestrator.facts import read_model_facts
from orchestrator.shard import LayerRange, ranges_from_cuts, write_shard
from worker.engine import EngineConfig, StageEngine


class Chain:
    def __init__(self, model: Path, cuts: Sequence[int], workdir: Path,
                 config: EngineConfig, codec: str = "f32") -> None:
        """``codec``: hidden states cross every hop encoded and decoded with this wire
        codec, exactly as between workers."""
        self.codec = get_codec(codec)
        facts = read_model_facts(model)
        self.ranges: tuple[LayerRange, ...] = ranges_from_cuts(facts.n_layers, cuts)
        self.stages = [
            StageEngine(write_shard(model, r, workdir / f"shard-{r.start}-{r.end}.gguf",
                                    facts=facts).path, config)
            for r in self.ranges
        ]

    def forward(self, session: str, positions: Sequence[int], tokens: Sequence[int],
                all_logits: bool = False) -> np.ndarray:
        out = self.stages[0].forward(session, positions, tokens=list(tokens),
                                     all_logits=all_logits)
        for stage in self.stages[1:]:
            out = self.codec.decode(self.codec.encode(out), *out.shape)
            out = stage.forward(session, positions, hidden=out, all_logits=all_logits)
        return out

    def end_session(self, session: str) -> None:
        for stage in self.stages:
            stage.end_session(session)

    def close(self) -> None:
        for stage in self.stages:
            stage.close()


def replay(chain: Chain, prompt: list[int], generated: list[int],
           session: str = "s") -> list[np.ndarray]:
    """Feed the reference's prompt and greedy tokens; return logits in the same layout."""
    out = [chain.forward(session, range(len(prompt)), prompt, all_logits=True)]
    pos = len(prompt)
    for tok in generated:
        out.append(chain.forward(session, [pos], [tok]))
        pos += 1
    return out
