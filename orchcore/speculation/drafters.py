"""Drafters: what proposes the next tokens for the target to verify, behind one interface.

``Drafter.propose(context, k)`` gets every token of the session so far (prompt, answer,
and the pending token the target has chosen but not yet evaluated) and returns at most
``k`` tokens; fewer, or none, when it has no good guess (the pass is then a plain step).

* ``PromptLookup`` (pure): n-gram lookup over the context itself. Input-grounded answers
  (rewrite this paragraph, repeat this code with one change, quote the document) copy long
  runs of it.
* ``DraftModel``: a small GGUF whose vocabulary is the target's (``vocab``), greedy, with
  its own KV cache kept in step with the context by rollback.
* Early exit (``open_early_exit``): the target's own first K layers with its final norm and
  head, an exit shard (``shard.write_exit_shard``) that runs as a whole model of K layers,
  in a ``DraftModel``. Same vocabulary by construction, no second model file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from orchcore.config import EngineConfig
from orchcore.engine import StageEngine
from orchcore.errors import InvalidSettingError
from orchcore.shard import write_exit_shard


@dataclass(frozen=True)
class Draft:
    """Proposed tokens; ``probs`` is the drafter's distribution per token (``[len, n_vocab]``)
    when it sampled them, None when it picked them deterministically (one-hot)."""

    tokens: tuple[int, ...]
    probs: np.ndarray | None = None


NO_DRAFT = Draft(())


class Drafter(Protocol):
    def propose(self, context: Sequence[int], k: int) -> Draft: ...


class PromptLookup:
    """The longest suffix of the context (``max_ngram`` down to ``min_ngram`` tokens) that
    occurred earlier in it; proposes what followed its latest earlier occurrence. When that
    runs into the end of the context (the text repeats with a period shorter than ``k``),
    the copy goes on over what it has copied, as an LZ77 copy does: ``a b a b`` proposes
    ``a b a b ...``, not one token."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidSettingError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got "
                                      f"{min_ngram} and {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: Sequence[int], k: int) -> Draft:
        tokens = np.asarray(context, dtype=np.int64)
        if k <= 0:
            return NO_DRAFT
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            start = _latest_earlier(tokens, n)
            if start is not None:
                copied = [int(t) for t in tokens[start + n:start + n + k]]
                period = len(tokens) - n - start
                while len(copied) < k:
                    copied.append(copied[len(copied) - period])
                return Draft(tuple(copied))
        return NO_DRAFT


def _latest_earlier(tokens: np.ndarray, n: int) -> int | None:
    """Start of the latest occurrence of the last ``n`` tokens that ends before the last
    token (so something follows it), or None."""
    windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
    hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
    return int(hits[-1]) if len(hits) else None


class DraftModel:
    """A small whole model in a ``StageEngine``, drafting greedily. Open it with
    ``vocab.open_draft_model`` (which refuses a vocabulary unlike the target's), or over
    the target's exit shard with ``open_early_exit``."""

    def __init__(self, engine: StageEngine, session: str = "draft") -> None:
        if not (engine.role.is_first and engine.role.is_last):
            raise InvalidSettingError(f"{engine.label} is a shard; a draft model must be a "
                                      f"whole model")
        self.engine, self.session = engine, session
        self._fed: list[int] = []  # tokens in the draft engine's KV cache, in order

    def propose(self, context: Sequence[int], k: int) -> Draft:
        if k <= 0 or not context:
            return NO_DRAFT
        room = self.engine.config.context_tokens - len(context)
        k = min(k, room)
        if k <= 0:
            return NO_DRAFT
        logits = self._catch_up(list(context))
        drafts: list[int] = []
        while True:
            drafts.append(int(logits[-1].argmax()))
            if len(drafts) == k:
                return Draft(tuple(drafts))
            logits = self._feed([drafts[-1]])

    def _catch_up(self, context: list[int]) -> np.ndarray:
        """Roll back to the longest prefix shared with ``context`` (keeping at least one
        token to feed, for logits), then feed the rest."""
        same = 0
        for a, b in zip(self._fed, context, strict=False):
            if a != b:
                break
            same += 1
        same = min(same, len(context) - 1)
        self.engine.rollback(self.session, same)
        del self._fed[same:]
        rest = context[same:]
        step = self.engine.config.batch_tokens
        for i in range(0, len(rest), step):
            logits = self._feed(rest[i:i + step])
        return logits

    def _feed(self, tokens: list[int]) -> np.ndarray:
        start = len(self._fed)
        out = self.engine.forward(self.session, range(start, start + len(tokens)),
                                  tokens=tokens)
        self._fed += tokens
        return out

    def close(self) -> None:
        self.engine.close()


def open_early_exit(model: Path | str, k: int, dest: Path | str,
                    config: EngineConfig) -> DraftModel:
    """The early-exit drafter of ``model``: its first ``k`` layers with its final norm and
    head, written to ``dest`` as an exit shard, drafting greedily in a ``DraftModel``."""
    shard = write_exit_shard(model, k, dest)
    return DraftModel(StageEngine(shard.path, config,
                                  label=f"the exit shard of layers {shard.layout.layers}"))
