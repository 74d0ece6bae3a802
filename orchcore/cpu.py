"""What this machine's CPU and memory are, read from the OS (Linux first, portable fallbacks)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import psutil

# ggml's AMX kernels crash the pinned build on first decode (FINDINGS 1); these cpuinfo
# flags announce AMX.
_AMX_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16"})
# AMX is an x86 extension. An emulated ARM machine (qemu-user) reads its host's
# /proc/cpuinfo, AMX flags included: they say nothing about the CPU the code runs on.
_X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686"})


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str
    cores: int  # logical CPUs this process may use
    flags: frozenset[str]

    @property
    def has_amx(self) -> bool:
        return self.arch.lower() in _X86_MACHINES and bool(self.flags & _AMX_FLAGS)


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    model, flags = platform.processor() or platform.machine(), frozenset[str]()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and value.strip():
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = frozenset(value.split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return CpuInfo(model=model, arch=platform.machine(), cores=cores or 1, flags=flags)


def use_extra_buffer_types(info: CpuInfo | None = None) -> bool:
    """Whether llama.cpp may use its extra (repacking) buffer types on this CPU.

    They carry the AMX kernels that crash on x86 CPUs with AMX, and the Q4_0 repacking
    that makes ARM NEON fast, so the answer is per CPU: off exactly when AMX is present.
    """
    return not (info or cpu_info()).has_amx


@dataclass(frozen=True)
class MemoryInfo:
    total: int
    available: int


def memory_info() -> MemoryInfo:
    mem = psutil.virtual_memory()
    return MemoryInfo(total=int(mem.total), available=int(mem.available))


def host_id() -> str:
    """The same for every process on one running machine, different on every other.

    Linux's boot id: random at each boot, so cloned SD cards that share a machine id
    still differ; workers on one machine report the same id and the planner counts their
    memory against one RAM. Elsewhere: the host name.
    """
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    try:
        return boot_id.read_text().strip()
    except OSError:
        return platform.node()
