"""What this worker's process holds with nothing loaded: measured at start, once per version.

The memory estimate's first term (``orchcore.memory``) is the process itself: the
interpreter, numpy, gRPC with TLS, llama.cpp's libraries and what its first decode leaves
behind (its threads, the pages of its kernels). A worker measures it when it starts: it
loads a tiny generated model, runs a few tokens, frees it, and reads its own resident set.
The figure is kept in the state folder per software version and thread count, so later
starts only read it. Info reports it; the planner and the worker's own admission both put
it into the one estimate, so they agree to the byte.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import logging
import os
from pathlib import Path

import llama_cpp

from orchcore import __version__, modelgen
from orchcore.config import EngineConfig
from orchcore.engine import StageEngine
from orchcore.files import read_json, write_atomic

log = logging.getLogger(__name__)

_FILE = "baseline.json"
_WARM_TOKENS = 8  # a short prompt, then one decode step


def process_baseline(folder: Path, threads: int) -> int:
    """This process's resident bytes with a warmed engine and nothing loaded: kept in
    ``folder`` for this version and ``threads``, else measured now (0: cannot be read on
    this system)."""
    known = read_json(folder / _FILE).get(_key(threads))
    if isinstance(known, int) and known > 0:
        return known
    measured = _measure(folder, threads)
    if measured:
        keep(folder, threads, measured)
    return measured


def keep(folder: Path, threads: int, baseline: int) -> None:
    """Keep ``baseline`` in ``folder`` as this version's figure for ``threads`` (the only
    one kept: older versions' figures go)."""
    write_atomic(folder / _FILE, json.dumps({_key(threads): baseline}) + "\n")


def _key(threads: int) -> str:
    return f"{__version__}-llama{llama_cpp.__version__}-t{threads}"


def _measure(folder: Path, threads: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / f".baseline.{os.getpid()}.gguf"
    modelgen.write_model(model, modelgen.preset("tiny-llama-gqa"))
    try:
        config = EngineConfig(context_tokens=64, max_sessions=1, batch_tokens=_WARM_TOKENS,
                              threads=threads)
        with StageEngine(model, config, label="the warm-up model") as engine:
            engine.forward("warm", list(range(_WARM_TOKENS)), tokens=list(range(1, 9)))
            engine.forward("warm", [_WARM_TOKENS], tokens=[1])
    finally:
        model.unlink(missing_ok=True)
    gc.collect()
    trim_heap()
    return resident_bytes()


def resident_bytes() -> int:
    """This process's resident set now (VmRSS), in bytes; 0 where /proc cannot tell."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def trim_heap() -> None:
    """Give freed heap pages back to the system (glibc), so the figure is what stays."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
