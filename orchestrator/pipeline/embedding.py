"""Embeddings through the stages: the last stage answers a chunk asking for them with its
final norm's rows (llama.cpp's embeddings mode, per token), and they are pooled here, over
every chunk of the input, as the model's GGUF says (``{arch}.pooling_type``: mean when it
names none, the last or the first token's row where it says so)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import gguf
import numpy as np

from orchcore.errors import InvalidInputError
from orchcore.facts import ModelFacts
from orchestrator.pipeline.datapath import DataPath

Pooling = Literal["mean", "last", "first"]

_POOLINGS: dict[int, Pooling] = {gguf.PoolingType.NONE: "mean", gguf.PoolingType.MEAN: "mean",
                                 gguf.PoolingType.LAST: "last", gguf.PoolingType.CLS: "first"}


def pooling_of(facts: ModelFacts) -> Pooling | None:
    """How this model's embeddings are pooled; None for a reranker (``rank``), which has
    no embedding to give."""
    kind = facts.metadata.get(gguf.Keys.LLM.POOLING_TYPE.format(arch=facts.arch),
                              gguf.PoolingType.NONE)
    return _POOLINGS.get(int(kind))


def pool(rows: np.ndarray, pooling: Pooling) -> np.ndarray:
    """One vector (float64) for ``rows``, one per token of the input."""
    if pooling == "last":
        return rows[-1].astype(np.float64)
    if pooling == "first":
        return rows[0].astype(np.float64)
    return rows.astype(np.float64).mean(axis=0)


def final_rows(path: DataPath, session: str, tokens: Sequence[int], size: int) -> np.ndarray:
    """The final norm's row of every token of ``tokens``, sent as ``session`` in chunks of
    at most ``size`` (the last stage's output rows), all in flight at once."""
    if not tokens:
        raise InvalidInputError("an input to embed is empty: give some text")
    numbers = [path.send(session, start, tokens[start:start + size], want_token=False,
                         embed=True) for start in range(0, len(tokens), size)]
    return np.concatenate([path.wait(session, n).embedding.decode() for n in numbers])
