"""Helpers shared by the engine benchmarks: the header, the models, the shards.

The benchmarks run from a checkout with its venv (``python bench/engine_speed.py``), which
has the checkout's ``testkit`` on its path (``scripts/setup.sh``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from rich.console import Console

from orchcore.facts import read_model_facts
from orchcore.shard import LayerRange, even_ranges, write_shard

ROOT = Path(__file__).resolve().parent.parent

MIB = 1 << 20
GENERATED = "bench-1b-q4_0"  # orchcore/modelgen.py preset: ~1.04e9 parameters, Q4_0
REAL = "smollm2-135m"  # orchestrator/models/store.py built-in model
MODEL_CHOICES = {"1b": GENERATED, "135m": REAL}


def mib(n_bytes: float) -> float:
    return n_bytes / MIB


@dataclass(frozen=True)
class BenchModel:
    key: str  # "1b" or "135m", as on the command line
    label: str
    path: Path


def parse_models(text: str) -> list[str]:
    keys = [k.strip().lower() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODEL_CHOICES]
    if unknown or not keys:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(MODEL_CHOICES)}")
    return keys


def get_model(key: str, workdir: Path) -> BenchModel:
    """The generated 1B model (written once into ``workdir``) or the real 135M model."""
    if key == "1b":
        from orchcore.modelgen import n_params, preset, write_model

        spec = preset(GENERATED)
        path = workdir / f"{GENERATED}.gguf"
        if not path.exists():
            write_model(path, spec)
        return BenchModel(key, f"generated {GENERATED} ({n_params(spec) / 1e9:.2f}B params)",
                          path)
    from orchestrator.models.store import resolve_model

    return BenchModel(key, "SmolLM2-135M-Instruct Q4_1 (real)",
                      resolve_model(REAL, progress=False))


def halves(model: Path, workdir: Path) -> list[tuple[LayerRange, Path]]:
    """The even two-way cut of ``model``, written as shards into ``workdir``."""
    facts = read_model_facts(model)
    out = []
    for r in even_ranges(facts.n_layers, 2):
        dest = workdir / f"{model.stem}.{r.start}-{r.end}.gguf"
        if not dest.exists():
            write_shard(model, r, dest, facts=facts)
        out.append((r, dest))
    return out


@contextmanager
def work_directory(given: str | None) -> Iterator[Path]:
    """``given`` (kept afterwards, so generated files are reused), else a temporary one."""
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        yield Path(tmp)


def prompt_tokens(n: int, n_vocab: int, seed: int = 0) -> list[int]:
    """``n`` deterministic token ids; the generated model's weights are random anyway."""
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3, n_vocab, size=n)]


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def command_line() -> str:
    exe = os.path.relpath(sys.executable, Path.cwd()) if sys.executable else "python"
    argv = [os.path.relpath(sys.argv[0], Path.cwd()), *sys.argv[1:]]
    return shlex.join([exe, *argv])


def machine_facts() -> dict[str, str]:
    from orchcore.cpu import cpu_info, memory_info, use_extra_buffer_types

    cpu, mem = cpu_info(), memory_info()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command_line(),
        "cpu": f"{cpu.model} ({cpu.arch}), {cpu.cores} cores usable, "
               f"AMX {'yes' if cpu.has_amx else 'no'}",
        "ram": f"{mem.total / (1 << 30):.1f} GiB total, {mem.available / (1 << 30):.1f} GiB "
               f"available",
        "extra buffer types": "on (Q4_0 weights repacked)" if use_extra_buffer_types()
        else "off",
        "load average": f"{load} (1, 5, 15 min) at start",
        "versions": f"python {platform.python_version()}, llama-cpp-python "
                    f"{_package_version('llama-cpp-python')}, gguf {_package_version('gguf')}, "
                    f"numpy {_package_version('numpy')}, kernel {platform.release()}",
    }


def console() -> Console:
    """A console wide enough for the tables also when the output goes to a file."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=160)


def print_header(console: Console, title: str) -> None:
    console.rule(title)
    for key, value in machine_facts().items():
        console.print(f"[bold]{key}[/]: {value}", highlight=False, soft_wrap=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def child_result(cmd: list[str]) -> dict:
    """Run a benchmark's child process; the last line it prints is its JSON result."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({done.returncode}): {' '.join(cmd)}\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
