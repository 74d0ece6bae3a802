"""How a run speculates, as the user names it: ``off``, ``auto``, ``ngram``, ``ngram:K``,
``draft:MODEL`` or ``early:K``.

``draft:MODEL`` drafts with a small model (a GGUF path or a known model's name, resolved
like the run's own model argument) on the orchestrator, ``DEFAULT_K`` tokens per pass.
``early:K`` drafts the same way with the target's own first K layers, its final norm and
its head (an exit shard cut on the orchestrator). Pure.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from orchcore.errors import InvalidSettingError

DEFAULT_K = 4  # drafts per pass for ``ngram`` without a K, and for ``draft:MODEL``
MAX_K = 16
Kind = Literal["off", "auto", "ngram", "draft", "early"]
_CHOICES = "choose off, auto, ngram, ngram:K, draft:MODEL or early:K"


class SpeculationMode(NamedTuple):
    kind: Kind
    k: int = 0  # drafts per pass for ngram and draft; the most auto may choose
    draft_model: str | None = None  # draft: the model as given (a path or a name)
    exit_layers: int = 0  # early: the target's first layers that draft

    @property
    def on(self) -> bool:
        return self.kind != "off"

    @property
    def model_drafts(self) -> bool:
        """Whether a model drafts on the orchestrator (``draft:MODEL`` or ``early:K``)."""
        return self.kind in ("draft", "early")


def parse_mode(text: str) -> SpeculationMode:
    """``off``, ``auto``, ``ngram``, ``ngram:K`` (1 <= K <= 16), ``draft:MODEL`` (MODEL
    as written: a path keeps its case and colons) or ``early:K`` (K layers, at least 1; the
    model's count bounds it when it is known); anything else is refused with what to write
    instead."""
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
    if name == "early":
        if arg.isdigit() and int(arg) >= 1:
            return SpeculationMode("early", DEFAULT_K, exit_layers=int(arg))
        raise InvalidSettingError("K of early:K is how many of the model's first layers "
                                  "draft: a whole number, at least 1 and fewer than its "
                                  "layers (orch info MODEL shows them)")
    raise InvalidSettingError(_CHOICES)
