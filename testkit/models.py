"""The test model cache: every model the tests use, generated or fetched, is made once and
kept for later runs, in one folder of bounded size (never in a test's temporary folder).

The folder is ``$ORCH_TEST_CACHE``, else ``$XDG_CACHE_HOME/orch-test``, else
``~/.cache/orch-test``::

    generated/<key>/<name>   a model of ``orchcore.modelgen``; the key hashes its spec, the
                             split and the generator's source, so a change to any of them
                             makes a new model
    generated/<key>/ready    the first file's name, written last; its mtime is the last use
    generated/<key>.lock     flock held while the model is written (runs in parallel wait)
    fetched/                 the orch model store of the real models (SmolLM2, Gemma 3)
    requantized/<stem>.Q4_0.gguf  a real model requantized by llama.cpp (a draft model of
                             the shipped one, whose batches are cheap on x86)

When a new model takes the folder over ``LIMIT_BYTES``, the generated models used least
recently are removed until it fits again.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import llama_cpp

from orchcore import modelblocks, modelgen, modelvocab
from orchcore.files import locked, write_atomic
from orchcore.llama_ext import init_backend
from orchcore.modelgen import ModelSpec

log = logging.getLogger(__name__)

LIMIT_BYTES = 3 << 30  # 3 GiB: the 1B model, the MoE mini, the real models and the rest
_READY = "ready"


def cache_root() -> Path:
    """``$ORCH_TEST_CACHE``, else ``$XDG_CACHE_HOME/orch-test``, else ``~/.cache/orch-test``."""
    if explicit := os.environ.get("ORCH_TEST_CACHE"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "orch-test"
    return Path.home() / ".cache" / "orch-test"


def generated_model(spec: ModelSpec, name: str = "model.gguf", *,
                    split_max_tensors: int = 0) -> Path:
    """The model ``spec`` describes, written once into the cache as ``name`` (a gguf-split
    set with ``split_max_tensors``, as ``modelgen.write_model`` makes it); its first file.

    The files are shared by every test and every run: read them, never change them.
    """
    folder = cache_root() / "generated" / _key(spec, name, split_max_tensors)
    ready = folder / _READY
    folder.parent.mkdir(parents=True, exist_ok=True)
    with locked(folder.with_name(folder.name + ".lock")):
        if not ready.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a killed run left half-written
            started = time.monotonic()
            first = modelgen.write_model(folder / name, spec, split_max_tensors=split_max_tensors)
            write_atomic(ready, first.name)
            log.info("generated %s in %.1f s", first, time.monotonic() - started)
        now = time.time_ns()  # used now: the last to be evicted (finer than the fs clock)
        os.utime(ready, ns=(now, now))
        first = folder / ready.read_text()
    _evict(keep=folder)
    return first


def fetched_cache() -> Path:
    """The orch cache folder (``resolve_model(cache=...)``) the real models are fetched into."""
    return cache_root() / "fetched"


def fetched_model(name: str) -> Path:
    """A model of orch's registry (``smollm2-135m``, ``gemma3-270m``), fetched once into the
    cache's own model store and checked as ``orch`` checks it."""
    from orchestrator.models.store import resolve_model

    return resolve_model(name, cache=fetched_cache(), progress=False)


def requantized_model(source: Path) -> Path:
    """``source`` requantized to Q4_0 by llama.cpp (seconds for the 135M), made once into
    the cache."""
    dest = cache_root() / "requantized" / f"{source.stem}.Q4_0.gguf"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with locked(dest.with_name(dest.name + ".lock")):
        if dest.exists():
            return dest
        init_backend()  # llama.cpp's log to logging
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.allow_requantize = True
        params.nthread = 1
        part = dest.with_suffix(".part")
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(part).encode(),
                                              ctypes.byref(params))
        if code != 0:
            part.unlink(missing_ok=True)
            raise RuntimeError(f"llama_model_quantize of {source} failed with code {code}")
        part.rename(dest)
    return dest


def _key(spec: ModelSpec, name: str, split_max_tensors: int) -> str:
    generator = b"".join(Path(m.__file__).read_bytes() for m in (modelgen, modelvocab, modelblocks))
    text = f"{spec!r}|{name}|{split_max_tensors}|"
    return hashlib.sha256(text.encode() + generator).hexdigest()[:20]


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _evict(keep: Path) -> None:
    """Remove the least recently used generated models (never ``keep``) while the cache is
    over ``LIMIT_BYTES``."""
    root = cache_root()
    total = _size(root)
    if total <= LIMIT_BYTES:
        return
    entries = sorted((ready.stat().st_mtime, ready.parent)
                     for ready in (root / "generated").glob(f"*/{_READY}")
                     if ready.parent != keep)
    for _, folder in entries:
        if total <= LIMIT_BYTES:
            break
        with locked(folder.with_name(folder.name + ".lock")):
            size = _size(folder)
            shutil.rmtree(folder, ignore_errors=True)
        total -= size
        log.info("removed %s (%d MiB) from the test model cache", folder, size >> 20)
