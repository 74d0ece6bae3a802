"""One JSON line: what llama.cpp and orch see of this CPU (run inside the arm64 rootfs)."""

from __future__ import annotations

import json
import platform

import llama_cpp

from orchcore.cpu import cpu_info, use_extra_buffer_types


def main() -> None:
    features = llama_cpp.llama_print_system_info().decode()
    wanted = ("NEON", "ARM_FMA", "FP16_VA", "DOTPROD", "MATMUL_INT8", "SVE", "REPACK")
    flags = {}
    for part in features.replace("|", " ").split():
        key, _, value = part.partition("=")
        if key in wanted:
            flags[key] = value
    info = cpu_info()
    print(json.dumps({
        "machine": platform.machine(), "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__, "cpu_flags_seen": len(info.flags),
        "amx": info.has_amx, "extra_buffer_types": use_extra_buffer_types(), "ggml": flags,
    }))


if __name__ == "__main__":
    main()
