"""Measured speeds, refined by real runs: seconds per layer per decoded token, kept in the
orchestrator's cache.

What a stage costs per decoded token, the model this book and the planner share
(``stage_layers``): its layers, plus on the last stage the lm head's rows, plus on the
first stage the input table's looked-up row, all at the device's one measured figure.
Decoding on a CPU reads every weight once per token, so a head row costs its bytes at the
bytes per second a layer runs at (what the probe measures): the head of a 151,936-row
vocabulary weighs several layers, and the stage that runs it takes longer without its
device being any slower.

The capability probe gives the first figure; an answer of ``MIN_DECODE_TOKENS`` or more
decode steps gives each stage's own compute time, and ``SpeedBook.refine`` turns it back
into a time per layer by dividing by the stage's layer-equivalents (so the head's share is
never filed as the device being slow), then averages it with the figure kept before.

Figures are kept per device kind (``device_key``): workers on one machine with the same
cores and threads share one figure, whichever stage each ran. Otherwise each of three
identical workers learns a figure of its own, a few percent apart, and the next plan
reads that noise as one being faster.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from orchcore.devices import DeviceFacts
from orchcore.facts import ModelFacts
from orchcore.files import read_json, write_atomic

if TYPE_CHECKING:
    from orchestrator.planning.plan import Plan

log = logging.getLogger(__name__)

MIN_DECODE_TOKENS = 8


def _mean_layer_bytes(facts: ModelFacts) -> float:
    return sum(facts.active_layer_bytes) / facts.n_layers


def head_layers(facts: ModelFacts) -> float:
    """The lm head's decode cost in layers: its rows' bytes over the bytes a mean layer
    reads (a mixture of experts: the shared tensors and the used experts)."""
    return facts.output_bytes / _mean_layer_bytes(facts)


def lookup_layers(facts: ModelFacts) -> float:
    """The first stage's input lookup in layers: one row of the input table per token."""
    return facts.embedding_bytes / max(facts.n_vocab, 1) / _mean_layer_bytes(facts)


def stage_layers(facts: ModelFacts, start: int, end: int) -> float:
    """What the stage ``[start, end)`` computes per decoded token, in mean layers: its
    layers, the head's rows if it is last, the input lookup if it is first."""
    return ((end - start) + (head_layers(facts) if end == facts.n_layers else 0.0)
            + (lookup_layers(facts) if start == 0 else 0.0))


def device_key(device: DeviceFacts, shape_key: str) -> str:
    """The book's key: one machine (``host_id``), its kind of worker, one layer shape."""
    return f"{device.host_id}:{device.arch}:{device.cores}c{device.threads}t:{shape_key}"


def run_figures(plan: Plan, facts: ModelFacts, shape_key: str,
                compute_ms: Mapping[int, float], decode_tokens: int) -> dict[str, list[float]]:
    """Seconds per layer each device kind showed in one answer (by ``device_key``): each
    stage's compute over its decode steps and its layer-equivalents (``stage_layers``)."""
    figures: dict[str, list[float]] = {}
    for stage in plan.stages:
        if stage.index not in compute_ms:
            continue
        layers = stage_layers(facts, stage.layers.start, stage.layers.end)
        per_layer = compute_ms[stage.index] / 1e3 / decode_tokens / layers
        figures.setdefault(device_key(stage.device, shape_key), []).append(per_layer)
    return figures


class SpeedBook:
    def __init__(self, path: Path) -> None:
        self.path = path

    def speed(self, device: DeviceFacts, shape_key: str) -> float | None:
        """The refined time per layer of ``device``'s kind on the shape, if runs gave one."""
        return read_json(self.path).get(device_key(device, shape_key))

    def refine(self, plan: Plan, facts: ModelFacts, shape_key: str,
               compute_ms: Mapping[int, float], decode_tokens: int) -> None:
        """Keep what one answer measured (each stage's compute over ``decode_tokens``
        steps) for the next plan: per device kind, the mean of its stages, averaged with
        the figure kept before."""
        if decode_tokens < MIN_DECODE_TOKENS:
            return
        book = read_json(self.path)
        for key, seen in run_figures(plan, facts, shape_key, compute_ms, decode_tokens).items():
            measured = sum(seen) / len(seen)
            old = book.get(key)
            book[key] = measured if old is None else (old + measured) / 2
        self._write(book)

    def _write(self, book: dict) -> None:
        try:
            write_atomic(self.path, json.dumps(book, indent=1))
        except OSError as exc:
            log.debug("cannot keep measured speeds in %s: %s", self.path, exc)
