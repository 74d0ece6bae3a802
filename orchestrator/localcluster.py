"""The embedded default: N worker processes on loopback, started and stopped by us.

Each worker gets its own cache folder (so shards stay cached between runs), a free port,
and the cluster's random token. On Linux the children also die with their parent
(PR_SET_PDEATHSIG), so even a killed orchestrator leaves no worker behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orchestrator.errors import WorkerUnreachableError

log = logging.getLogger(__name__)

START_DEADLINE_S = 60.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class LocalCluster:
    def __init__(self, n_workers: int, cache_root: Path, threads_per_worker: int,
                 token: str | None = None, log_dir: Path | None = None) -> None:
        if n_workers < 1:
            raise ValueError("a local cluster needs at least one worker")
        self.n_workers = n_workers
        self.cache_root = cache_root
        self.threads = threads_per_worker
        self.token = token or secrets.token_urlsafe(24)
        self._tmp = tempfile.TemporaryDirectory(prefix="orch-local-")
        self.log_dir = log_dir or cache_root / "logs"  # kept after stop, for post-mortems
        self._logs: list = []
        self.procs: list[subprocess.Popen] = []
        self.addresses: list[str] = []

    def start(self) -> list[str]:
        ready_files = []
        for i in range(self.n_workers):
            ready = Path(self._tmp.name) / f"worker-{i}.ready"
            ready_files.append(ready)
            env = dict(os.environ, ORCH_WORKER_TOKEN=self.token)
            cmd = [sys.executable, "-m", "orchestrator.cli", "worker", "--host", "127.0.0.1",
                   "--port", "0", "--cache-dir", str(self.cache_root / f"worker-{i}"),
                   "--threads", str(self.threads), "--ready-file", str(ready)]
            self.log_dir.mkdir(parents=True, exist_ok=True)
            logf = (self.log_dir / f"worker-{i}.log").open("wb")
            self._logs.append(logf)
            self.procs.append(subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None))
        self.addresses = [self._await_ready(i, f) for i, f in enumerate(ready_files)]
        return self.addresses

    def _await_ready(self, i: int, ready: Path) -> str:
        give_up = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < give_up:
            if ready.exists():
                return ready.read_text().strip()
            if self.procs[i].poll() is not None:
                raise WorkerUnreachableError(f"local #{i}", f"exited at start with code "
                                             f"{self.procs[i].returncode}: {self.log_tail(i)}")
            time.sleep(0.05)
        raise WorkerUnreachableError(f"local #{i}", f"not ready after {START_DEADLINE_S:.0f} s")

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
        self._tmp.cleanup()

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
