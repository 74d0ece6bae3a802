"""How a run speculates, as the user names it: ``off``, ``auto``, ``ngram`` or ``ngram:K``.

``draft:MODEL`` (a draft model on a worker) and ``early:K`` (the target's first K layers
as the drafter) are designed (``docs/speculation.md``) but not built: they are refused
with a message that says so. Pure.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from orchcore.errors import InvalidSettingError

DEFAULT_K = 4  # drafts per pass for ``ngram`` without a K
MAX_K = 16
Kind = Literal["off", "auto", "ngram"]
_NOT_BUILT = {"draft": "drafting with a draft model is designed",
              "early": "drafting with the model's own first layers (early exit) is designed"}


class SpeculationMode(NamedTuple):
    kind: Kind
    k: int = 0  # drafts per pass for ngram; the most auto may choose

    @property
    def on(self) -> bool:
        return self.kind != "off"


def parse_mode(text: str) -> SpeculationMode:
    """``off``, ``auto``, ``ngram`` or ``ngram:K`` (1 <= K <= 16); anything else is refused
    with what to write instead."""
    name, _, arg = text.strip().lower().partition(":")
    if name in ("off", "auto") and not arg:
        return SpeculationMode(name, 0 if name == "off" else MAX_K)
    if name == "ngram":
        if not arg:
            return SpeculationMode("ngram", DEFAULT_K)
        if arg.isdigit() and 1 <= int(arg) <= MAX_K:
            return SpeculationMode("ngram", int(arg))
        raise InvalidSettingError(f"K of ngram:K must be a whole number in 1..{MAX_K}")
    if name in _NOT_BUILT:
        raise InvalidSettingError(f"{_NOT_BUILT[name]} (docs/speculation.md) but not built "
                                  f"yet; use off, auto or ngram")
    raise InvalidSettingError("choose off, auto, ngram or ngram:K")
