"""Which drafted tokens the target keeps: pure numpy, exact.

Rows of a verification pass: row ``i`` holds the target's logits for the position after
``[pending, *drafts][i]``, so row ``i`` judges ``drafts[i]`` and the row after the last
accepted draft gives the target's own next token.

* Greedy: keep the longest prefix of drafts equal to the row's argmax (ties to the lowest
  id, as ``SamplingParams`` promises), then the argmax of the next row.
* Sampled: speculative sampling (Leviathan et al. 2023; Chen et al. 2023). Keep draft ``x``
  with probability ``min(1, p(x) / q(x))``; at the first refusal draw from
  ``normalize(max(0, p - q))`` and stop; if every draft is kept, draw the extra token from
  the next row's ``p``. The tokens that come out follow the target's distribution ``p``
  exactly, whatever ``q`` is. A deterministic drafter (prompt lookup, a greedy draft model)
  has a one-hot ``q``: ``x`` is kept with probability ``p(x)`` and the redraw is ``p`` with
  ``x`` taken out.

``target_probs`` is the target's distribution for given ``SamplingParams``, in llama.cpp's
default chain order (``worker.sampler``): top-k, top-p and min-p on the untempered
probabilities, then temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from orchcore.errors import InvalidInputError, InvalidSettingError
from orchcore.sampling import SamplingParams


@dataclass(frozen=True)
class Verdict:
    """A verification pass's outcome: ``accepted`` drafts kept, then ``token``."""

    accepted: int
    token: int

    def tokens(self, drafts: Sequence[int]) -> list[int]:
        """The tokens this pass adds to the answer after the pending one."""
        return [*drafts[:self.accepted], self.token]


def _check_rows(drafts: Sequence[int], rows: np.ndarray, what: str) -> None:
    if rows.ndim != 2 or rows.shape[0] != len(drafts) + 1:
        raise InvalidInputError(f"{what}: need {len(drafts) + 1} rows for {len(drafts)} "
                                f"drafts, got shape {rows.shape}")
    if drafts and (min(drafts) < 0 or max(drafts) >= rows.shape[1]):
        raise InvalidInputError(f"a drafted token id is outside the vocabulary of "
                                f"{rows.shape[1]}: {min(drafts)}..{max(drafts)}")


def greedy_verdict(drafts: Sequence[int], logits: np.ndarray) -> Verdict:
    """The longest prefix of ``drafts`` equal to the target's argmax, plus one token."""
    _check_rows(drafts, logits, "logits")
    best = logits.argmax(axis=1)
    m = 0
    while m < len(drafts) and drafts[m] == best[m]:
        m += 1
    return Verdict(m, int(best[m]))


def target_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Per row, the distribution ``params`` samples from (float64 ``[n, n_vocab]``).

    Repeat penalties depend on each row's history and are not applied here; speculation
    is off for penalised sessions (``cost.speculation_allowed``)."""
    if params.greedy:
        raise InvalidSettingError("temperature 0 is greedy: use greedy_verdict")
    if params.penalised:
        raise InvalidSettingError("repeat penalties are not supported with speculation; "
                                  "set repeat_penalty to 1")
    x = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    keep = np.ones(x.shape, dtype=bool)
    order = np.argsort(-x, axis=1, kind="stable")  # most likely first, ties to lower ids
    ranked = np.take_along_axis(x, order, axis=1)
    if 0 < params.top_k < x.shape[1]:
        np.put_along_axis(keep, order[:, params.top_k:], False, axis=1)
    if params.top_p < 1.0:
        ranked_keep = np.take_along_axis(keep, order, axis=1)
        mass = np.where(ranked_keep, np.exp(ranked - ranked[:, :1]), 0.0)
        cum = np.cumsum(mass, axis=1) / mass.sum(axis=1, keepdims=True)
        before = np.concatenate([np.zeros((len(x), 1)), cum[:, :-1]], axis=1)
        # up to and including the first token where the mass reaches top_p
        np.put_along_axis(keep, order, ranked_keep & (before < params.top_p), axis=1)
    if params.min_p > 0.0:
        keep &= x >= x.max(axis=1, keepdims=True) + np.log(params.min_p)
    z = np.where(keep, x / params.temperature, -np.inf)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """One token from the (not necessarily normalised) weights ``p``."""
    cum = np.cumsum(p)
    i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
    return min(i, len(p) - 1)


def speculative_verdict(drafts: Sequence[int], p: np.ndarray, q: np.ndarray | None,
                        rng: np.random.Generator) -> Verdict:
    """Accept/resample: ``p`` the target's distributions (``len(drafts) + 1`` rows), ``q``
    the drafter's (one row per draft), or None for a deterministic drafter (one-hot)."""
    _check_rows(drafts, p, "target distributions")
    if q is not None and q.shape != (len(drafts), p.shape[1]):
        raise InvalidInputError(f"draft distributions of shape {q.shape}, expected "
                                f"{(len(drafts), p.shape[1])}")
    for i, x in enumerate(drafts):
        qx = 1.0 if q is None else float(q[i, x])
        if qx <= 0.0:
            raise InvalidInputError(f"draft {i} (token {x}) has probability 0 under its own "
                                    f"drafter's distribution")
        if rng.random() * qx < p[i, x]:  # probability min(1, p(x) / q(x))
            continue
        if q is None:
            residual = p[i].copy()
            residual[x] = 0.0
        else:
            residual = np.maximum(p[i] - q[i], 0.0)
        if residual.sum() <= 0.0:  # p <= q everywhere: only rounding can get here
            residual = p[i]
        return Verdict(i, draw(residual, rng))
    return Verdict(len(drafts), draw(p[-1], rng))
