"""The embedded default: N worker processes on loopback, started and stopped by us.

Each worker gets its own cache folder (so shards stay cached between runs), a free port,
and the cluster's random token. On Linux the children also die with their parent
(PR_SET_PDEATHSIG), so even a killed orchestrator leaves no worker behind.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from orchcore.errors import WorkerUnreachableError

log = logging.getLogger(__name__)


class LocalCluster:
    def __init__(self, n_workers: int, cache_root: Path, threads_per_worker: int = 0,
                 token: str | None = None, log_dir: Path | None = None,
                 start_deadline_s: float = 60.0,
                 memory_budgets_mb: Sequence[int] | None = None,
                 pin_cores: bool = False) -> None:
        if n_workers < 1:
            raise ValueError("a local cluster needs at least one worker")
        self.n_workers = n_workers
        self.cache_root = cache_root
        self.threads = threads_per_worker  # 0 = every core
        self.start_deadline_s = start_deadline_s
        if memory_budgets_mb is not None and len(memory_budgets_mb) != n_workers:
            raise ValueError(f"{len(memory_budgets_mb)} budgets for {n_workers} workers")
        self.budgets_mb = memory_budgets_mb  # None: each worker's default
        self.pin_cores = pin_cores  # worker i on core i alone: separate hosts, in benchmarks
        self.token = token or secrets.token_urlsafe(24)
        self.log_dir = log_dir or cache_root / "logs"  # kept after stop, for post-mortems
        self._logs: list = []
        self.procs: list[subprocess.Popen] = []
        self.addresses: list[str] = []

    def start(self) -> list[str]:
        ready_files = []
        for i in range(self.n_workers):
            # Next to the logs, named by this process: no temporary folder to leave behind
            # if we are killed, and read then deleted at once.
            ready = self.log_dir / f"worker-{i}.{os.getpid()}.ready"
            ready.unlink(missing_ok=True)
            ready_files.append(ready)
            # The worker asks to die with us (PR_SET_PDEATHSIG) itself: no preexec_fn, whose
            # fork in a process with live gRPC threads can abort the child.
            env = dict(os.environ, ORCH_WORKER_TOKEN=self.token,
                       ORCH_WORKER_PARENT_PID=str(os.getpid()))
            cmd = [sys.executable, "-m", "orchestrator.cli", "worker", "--host", "127.0.0.1",
                   "--port", "0", "--cache-dir", str(self.cache_root / f"worker-{i}"),
                   "--threads", str(self.threads), "--ready-file", str(ready)]
            if self.budgets_mb is not None:
                cmd += ["--memory-budget-mb", str(self.budgets_mb[i])]
            self.log_dir.mkdir(parents=True, exist_ok=True)
            logf = (self.log_dir / f"worker-{i}.log").open("wb")
            self._logs.append(logf)
            self.procs.append(subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf))
            if self.pin_cores:  # set while the new process is still single-threaded
                cores = sorted(os.sched_getaffinity(0))
                os.sched_setaffinity(self.procs[-1].pid, {cores[i % len(cores)]})
        self.addresses = [self._await_ready(i, f) for i, f in enumerate(ready_files)]
        return self.addresses

    def _await_ready(self, i: int, ready: Path) -> str:
        give_up = time.monotonic() + self.start_deadline_s
        while time.monotonic() < give_up:
            if ready.exists():
                address = ready.read_text().strip()
                ready.unlink(missing_ok=True)
                return address
            if self.procs[i].poll() is not None:
                raise WorkerUnreachableError(f"local #{i}", f"exited at start with code "
                                             f"{self.procs[i].returncode}: {self.log_tail(i)}")
            time.sleep(0.05)
        raise WorkerUnreachableError(f"local #{i}",
                                     f"not ready after {self.start_deadline_s:.0f} s")

    def log_tail(self, i: int, lines: int = 5) -> str:
        path = self.log_dir / f"worker-{i}.log"
        if not path.exists():
            return "(no log)"
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise naming the first worker process that has died."""
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                name = self.addresses[i] if i < len(self.addresses) else f"local #{i}"
                raise WorkerUnreachableError(
                    name, f"the local worker process exited with code {proc.returncode} "
                          f"(log {self.log_dir / f'worker-{i}.log'}: {self.log_tail(i, 2)})")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                proc.send_signal(signal.SIGCONT)  # a stopped (hung) worker handles TERM too
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()
        for logf in self._logs:
            logf.close()
        self._logs.clear()
        for ready in self.log_dir.glob(f"worker-*.{os.getpid()}.ready"):
            ready.unlink(missing_ok=True)

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
