"""The capability probe's worker half: time a few layers of a given shape on this machine.

The probe model is written into the shard cache folder, timed with the same engine and
threads a stage would use, then deleted; the result is kept per shape in
``probe.json`` there, so a worker is measured once per model shape.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np

from orchcore import modelgen
from orchcore.config import EngineConfig
from orchcore.engine import StageEngine
from orchcore.facts import read_model_facts
from orchcore.files import read_json, write_atomic
from orchcore.probe import PROBE_LAYERS, PROBE_PREFILL_TOKENS, LayerShape

log = logging.getLogger(__name__)

DECODE_TOKENS = 48
_LOCK = threading.Lock()  # one probe at a time: they would time each other


def probe(shape: LayerShape, folder: Path, threads: int, layers: int = PROBE_LAYERS
          ) -> tuple[float, float, bool]:
    """(decode s per layer, prefill s per token per layer, whether it was cached), timed on
    ``layers`` layers of ``shape``."""
    results = folder / "probe.json"
    with _LOCK:
        known = read_json(results)
        key = f"{shape.key}-t{threads}"
        if key in known:
            return known[key]["decode"], known[key]["prefill"], True
        decode, prefill = _measure(shape, folder, threads, layers)
        known[key] = {"decode": decode, "prefill": prefill}
        write_atomic(results, json.dumps(known, indent=1))
    log.info("probe %s: %.2f ms per layer per token (decode)", shape.key, decode * 1e3)
    return decode, prefill, False


def _measure(shape: LayerShape, folder: Path, threads: int, layers: int
             ) -> tuple[float, float]:
    spec = shape.spec(layers)
    path = folder / f".probe-{shape.key}.gguf"
    modelgen.write_model(path, spec)
    try:
        engine = StageEngine(path, EngineConfig(context_tokens=256, max_sessions=2,
                                                batch_tokens=PROBE_PREFILL_TOKENS,
                                                threads=threads))
        try:
            tokens = (np.arange(PROBE_PREFILL_TOKENS) % (spec.n_vocab - 1) + 1).tolist()
            engine.forward("warm", list(range(8)), tokens=tokens[:8])
            engine.end_session("warm")
            prefill = float("inf")
            for session in ("p", "q"):  # the faster of two: a blip elsewhere is not speed
                started = time.perf_counter()
                engine.forward(session, list(range(PROBE_PREFILL_TOKENS)), tokens=tokens)
                prefill = min(prefill, time.perf_counter() - started)
            steps = []
            for i in range(DECODE_TOKENS):
                started = time.perf_counter()
                engine.forward("p", [PROBE_PREFILL_TOKENS + i], tokens=[tokens[i]])
                steps.append(time.perf_counter() - started)
            decode = float(np.median(steps))  # robust to the odd slow step
        finally:
            engine.close()
        probe_layer_bytes = sum(t.n_bytes for t in read_model_facts(path).layer_tensors(0))
    finally:
        path.unlink(missing_ok=True)
    scale = shape.layer_bytes / max(probe_layer_bytes, 1)
    return (decode / layers * scale, prefill / PROBE_PREFILL_TOKENS / layers * scale)
