"""One JSON line: what llama.cpp and orch see of this CPU (run inside the arm64 rootfs),
and whether a small generated Q4_0 model's weights get repacked when loaded."""

from __future__ import annotations

import json
import logging
import platform
import re
import tempfile
from pathlib import Path

import llama_cpp

from orchcore.cpu import cpu_info, use_extra_buffer_types
from orchcore.engine import EngineConfig, StageEngine
from orchcore.modelgen import GType, preset, write_model


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def repacked_buffers() -> dict[str, object]:
    """llama.cpp's model buffers (name -> size) for a 2-layer Q4_0 model in a StageEngine,
    and the layouts its weights were repacked to."""
    handler = _Lines()
    logger = logging.getLogger("llama.cpp")  # orchcore.llama_ext routes it there
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(Path(tmp) / "q4_0.gguf",
                           preset("tiny-llama-gqa", weight_type=GType.Q4_0, n_layers=2))
        with StageEngine(path, EngineConfig(threads=1, context_tokens=16, max_sessions=1)):
            pass
    logger.removeHandler(handler)
    text = "\n".join(handler.lines)
    buffers = dict(re.findall(r"(\S+) model buffer size =\s*([\d.]+ MiB)", text))
    return {**buffers, "repacked to": sorted(set(re.findall(r"repack tensor \S+ with (\S+)",
                                                             text)))}


def main() -> None:
    features = llama_cpp.llama_print_system_info().decode()
    wanted = ("NEON", "ARM_FMA", "FP16_VA", "DOTPROD", "MATMUL_INT8", "SVE", "REPACK")
    flags = {}
    for part in features.split("|"):  # "CPU : NEON = 1 | ARM_FMA = 1 | ..."
        key, _, value = part.rpartition(":")[2].partition("=")
        if key.strip() in wanted:
            flags[key.strip()] = value.strip()
    info = cpu_info()
    print(json.dumps({
        "machine": platform.machine(), "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__, "amx": info.has_amx,
        "extra_buffer_types": use_extra_buffer_types(), "ggml": flags,
        "q4_0_model_buffers": repacked_buffers(),
    }))


if __name__ == "__main__":
    main()
