"""Memory, open files and threads of a process tree over time, read from ``/proc`` (Linux).

    watch = ProcWatch({"serve": serve_pid, "worker 0": pid0, ...}, every_s=2.0)
    watch.start(); ...; watch.mark("after warm-up", done=20); ...; watch.stop()

A sample is every process's resident memory (``VmRSS``, and of it ``RssAnon``: heap and
other private memory, and ``RssFile``: pages of mapped files, which the kernel may drop),
open file descriptors (entries of ``/proc/PID/fd``) and threads (``Threads``). ``mark``
takes one at once under a name: the points a report compares; the periodic ones are the
timeline in between.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcSample:
    rss_kib: int
    anon_kib: int
    file_kib: int
    fds: int
    threads: int


@dataclass
class Snapshot:
    t_s: float  # since the watch started
    label: str  # "" for a periodic sample
    done: int  # requests finished when it was taken
    procs: dict[str, ProcSample | None] = field(default_factory=dict)  # None: process gone

    def to_json(self) -> dict:
        return {"t_s": round(self.t_s, 2), "label": self.label, "done": self.done,
                "procs": {k: asdict(v) if v else None for k, v in self.procs.items()}}


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (``/proc/PID/task/*/children``)."""
    kids: list[int] = []
    for task in (PROC / str(pid) / "task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def cmdline(pid: int) -> list[str]:
    return (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")


def sample(pid: int) -> ProcSample | None:
    try:
        status = (PROC / str(pid) / "status").read_text()
        fds = len(os.listdir(PROC / str(pid) / "fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    kib = {k: int(fields[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile")}
    return ProcSample(kib["VmRSS"], kib["RssAnon"], kib["RssFile"], fds,
                      int(fields["Threads"]))


class ProcWatch:
    def __init__(self, pids: dict[str, int], every_s: float) -> None:
        self.pids, self.every_s = pids, every_s
        self.snapshots: list[Snapshot] = []
        self.done = 0  # set by the caller as requests finish
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="procwatch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self, label: str) -> Snapshot:
        return self._take(label)

    def marked(self) -> list[Snapshot]:
        return [s for s in self.snapshots if s.label]

    def _take(self, label: str) -> Snapshot:
        snap = Snapshot(time.monotonic() - self._t0, label, self.done,
                        {name: sample(pid) for name, pid in self.pids.items()})
        with self._lock:
            self.snapshots.append(snap)
        return snap

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._take("")
