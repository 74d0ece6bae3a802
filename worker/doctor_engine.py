"""``orch doctor``'s engine and CPU checks: llama.cpp run in a child process on a generated
model, so a build that crashes on this CPU is reported instead of taking the doctor with it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from orchcore.cpu import cpu_info, use_extra_buffer_types
from orchcore.errors import OrchError
from worker.checkup import ENGINE_TIMEOUT_S, Check, DoctorOptions, Status

# --- the engine, in a child process --------------------------------------------------------

_CHILD = "from worker.doctor_engine import engine_selftest; engine_selftest()"


def engine_selftest() -> None:
    """The child's side of the engine check: a tiny generated model (Q4_0, so llama.cpp's
    repacking runs where it would) evaluates three tokens; prints one JSON line."""
    import tempfile

    import gguf
    import llama_cpp
    import numpy as np

    from orchcore.config import EngineConfig
    from orchcore.cpu import use_extra_buffer_types
    from orchcore.engine import StageEngine
    from orchcore.modelgen import ModelSpec, write_model

    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="orch-doctor-") as tmp:
            path = write_model(Path(tmp) / "doctor.gguf", ModelSpec(
                n_layers=2, weight_type=gguf.GGMLQuantizationType.Q4_0))
            config = EngineConfig(context_tokens=32, max_sessions=1, batch_tokens=4)
            with StageEngine(path, config, label="the doctor's test model") as engine:
                first = engine.forward("doctor", [0, 1], tokens=[1, 300])
                second = engine.forward("doctor", [2], tokens=[int(np.argmax(first[-1]))])
        finite = bool(np.isfinite(first).all() and np.isfinite(second).all())
        report = {"finite": finite, "seconds": time.perf_counter() - start}
    except OrchError as exc:
        report = {"error": str(exc)}
    report.update(llama_cpp=llama_cpp.__version__, extra_buffers=use_extra_buffer_types())
    print(json.dumps(report), flush=True)


class _EngineRun:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def result(self) -> Check:
        advice = ("reinstall orch in its own venv (`pip install -e .` in the checkout builds "
                  "the pinned llama-cpp-python for this CPU), then run orch doctor again")
        try:
            out, err = self.proc.communicate(timeout=ENGINE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return Check("engine", Status.FAIL, f"llama.cpp did not evaluate 3 tokens of a "
                         f"2-layer model in {ENGINE_TIMEOUT_S:.0f} s", advice)
        tail = " | ".join(err.strip().splitlines()[-3:])
        code = self.proc.returncode
        if code < 0:
            name = _signal_name(-code)
            return Check("engine", Status.FAIL, f"llama.cpp crashed ({name}) running a tiny "
                         f"model on this CPU{': ' + tail if tail else ''}",
                         f"{advice}; if it still crashes, report the CPU line of orch doctor")
        try:
            report = json.loads(out.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return Check("engine", Status.FAIL, f"the engine check exited with code {code}: "
                         f"{tail or 'no output'}", advice)
        version = f"llama-cpp-python {report.get('llama_cpp', '?')}"
        if "error" in report or not report.get("finite"):
            return Check("engine", Status.FAIL,
                         f"{version}: {report.get('error') or 'logits are not finite'}", advice)
        wall = time.monotonic() - self.start
        extra = "on" if report.get("extra_buffers") else "off"
        return Check("engine", Status.OK, f"{version} loaded a generated 2-layer Q4_0 model "
                     f"(extra buffer types {extra}) and evaluated 3 tokens in "
                     f"{report['seconds']:.2f} s ({wall:.1f} s with start-up)")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"



def check_cpu(options: DoctorOptions) -> Check:
    info = cpu_info()
    amx = sorted(f for f in info.flags if f.startswith("amx"))
    machine = f"{info.model} ({info.arch}, {info.cores} cores)"
    if not use_extra_buffer_types(info):
        return Check("cpu", Status.OK, f"{machine}; AMX ({', '.join(amx)}): llama.cpp's extra "
                     "buffer types are off, because ggml's AMX kernels crash the pinned "
                     "build on the first decode; weights are memory-mapped instead")
    found = (f"{machine}; no AMX: llama.cpp's extra buffer types are on (weights repacked "
             f"for this CPU, the file read rather than mapped)")
    if info.arch in ("x86_64", "AMD64") and info.flags and "avx2" not in info.flags:
        return Check("cpu", Status.WARN, f"{found}; no AVX2",
                     "llama.cpp is slow without AVX2: the planner gives this machine few "
                     "layers or leaves it as a standby")
    return Check("cpu", Status.OK, found)


