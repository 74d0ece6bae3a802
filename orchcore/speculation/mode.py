"""How a run speculates, as the user names it: ``off``, ``auto``, ``ngram``, ``ngram:K`` or
``draft:MODEL``.

``draft:MODEL`` drafts with a small model (a GGUF path or a known model's name, resolved
like the run's own model argument) on the orchestrator, ``DEFAULT_K`` tokens per pass.
``early:K`` (the target's first K layers as the drafter) is designed
(``docs/speculation.md``) but not built: it is refused with a message that says so. Pure.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from orchcore.errors import InvalidSettingError

DEFAULT_K = 4  # drafts per pass for ``ngram`` without a K, and for ``draft:MODEL``
MAX_K = 16
Kind = Literal["off", "auto", "ngram", "draft"]
_NOT_BUILT = {"early": "drafting with the model's own first layers (early exit) is designed"}
_CHOICES = "choose off, auto, ngram, ngram:K or draft:MODEL"


class SpeculationMode(NamedTuple):
    kind: Kind
    k: int = 0  # drafts per pass for ngram and draft; the most auto may choose
    draft_model: str | None = None  # draft: the model as given (a path or a name)

    @property
    def on(self) -> bool:
        return self.kind != "off"


def parse_mode(text: str) -> SpeculationMode:
    """``off``, ``auto``, ``ngram``, ``ngram:K`` (1 <= K <= 16) or ``draft:MODEL`` (MODEL
    as written: a path keeps its case and colons); anything else is refused with what to
    write instead."""
    head, _, given = text.strip().partition(":")
    name, arg = head.lower(), given.strip()
    if name in ("off", "auto") and not given:
        return SpeculationMode(name, 0 if name == "off" else MAX_K)
    if name == "ngram":
        if not given:
            return SpeculationMode("ngram", DEFAULT_K)
        if arg.isdigit() and 1 <= int(arg) <= MAX_K:
            return SpeculationMode("ngram", int(arg))
        raise InvalidSettingError(f"K of ngram:K must be a whole number in 1..{MAX_K}")
    if name == "draft":
        if not arg:
            raise InvalidSettingError("draft:MODEL needs a model: a .gguf file or a known "
                                      "model's name (orch list shows them)")
        return SpeculationMode("draft", DEFAULT_K, arg)
    if name in _NOT_BUILT:
        raise InvalidSettingError(f"{_NOT_BUILT[name]} (docs/speculation.md) but not built "
                                  f"yet; {_CHOICES}")
    raise InvalidSettingError(_CHOICES)
