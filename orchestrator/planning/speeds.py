"""Measured speeds, refined by real runs: seconds per layer per decoded token, for each
worker (by id) and layer shape, kept in the orchestrator's cache.

The capability probe gives a first figure; every answer of 8 or more decode steps then
gives the stages' own ``StageTiming``s, which replace it (an average with the previous
figure), so plans follow what the cluster really does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from orchcore.files import read_json, write_atomic

log = logging.getLogger(__name__)

MIN_DECODE_TOKENS = 8


class SpeedBook:
    def __init__(self, path: Path) -> None:
        self.path = path

    def get(self, worker_id: str, shape_key: str) -> float | None:
        return read_json(self.path).get(f"{worker_id}:{shape_key}")

    def record(self, worker_id: str, shape_key: str, s_per_layer: float) -> None:
        book = read_json(self.path)
        key = f"{worker_id}:{shape_key}"
        old = book.get(key)
        book[key] = s_per_layer if old is None else (old + s_per_layer) / 2
        try:
            write_atomic(self.path, json.dumps(book, indent=1))
        except OSError as exc:
            log.debug("cannot keep measured speeds in %s: %s", self.path, exc)
