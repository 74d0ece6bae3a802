"""Real workers for tests: a worker gRPC server in a thread of this process, a model
opened on a list of workers through the product's own session API, and the worker
processes a test left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psutil
from rich.console import Console

from orchcore.facts import read_model_facts
from orchcore.sampling import SamplingParams
from orchestrator.cli.drafts import open_draft
from orchestrator.pipeline.connected import Cluster
from orchestrator.pipeline.deploy import DeployProgress
from orchestrator.pipeline.session import GenerationStats, RunningModel
from orchestrator.planning.plan import make_plan
from orchestrator.settings import OrchSettings
from orchestrator.text.tokenizer import Tokenizer
from testkit.waiting import WaitTimeout, wait_until
from worker.server import serve
from worker.settings import WorkerSettings

GREEDY = SamplingParams(temperature=0.0)


@contextmanager
def worker_server(root: Path, **settings: object) -> Iterator[str]:
    """A real worker gRPC server on loopback, in a thread of this process."""
    ready = root / "ready"
    stop = threading.Event()
    config = WorkerSettings(host="127.0.0.1", port=0, cache_dir=root / "cache", ready_file=ready,
                            threads=1, **settings)
    thread = threading.Thread(target=serve, args=(config,), kwargs={"stop": stop}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: ready.exists() or not thread.is_alive(), 30,
                   f"the worker in {root} to be ready")
        if not ready.exists():
            raise AssertionError(f"the worker in {root} stopped before it was ready (its "
                                 "exception is in the captured log)")
        yield ready.read_text().strip()
    finally:
        stop.set()
        thread.join(timeout=20)


@contextmanager
def open_model(model: Path, addresses: Sequence[str], token: str | None, workdir: Path,
               alive=None, force: bool = False, measure: bool = False,
               progress: DeployProgress | None = None,
               **settings: object) -> Iterator[RunningModel]:
    """``model`` deployed on ``addresses`` (in order) with ``OrchSettings(**settings)``;
    with ``measure``, planned on the workers' probed speeds; with ``speculate="draft:M"``,
    M drafting in this process as ``orch run`` loads it."""
    config = OrchSettings.load(**{"context_tokens": 512, **settings})
    facts = read_model_facts(model)
    with ExitStack() as stack:
        draft = open_draft(stack, config, model, Console(stderr=True))
        cluster = Cluster.connect(addresses, token, config, alive)
        stack.callback(cluster.close)
        if measure:
            cluster.measure_speeds(facts)
        plan = make_plan(facts, cluster.devices, config.plan_options(use_all=True))
        tokenizer = stack.enter_context(Tokenizer.from_gguf(model))
        with cluster.open(plan, facts, tokenizer, progress, force=force,
                          draft=draft) as opened:
            yield opened


def greedy_tokens(model: RunningModel, prompt: Sequence[int], n: int,
                  stats: GenerationStats | None = None) -> list[int]:
    return list(model.stream(model.new_session(GREEDY), prompt, n, stats))


def worker_once(folder: Path, token: str, *flags: str, host: str = "127.0.0.1"
                ) -> subprocess.CompletedProcess[str]:
    """`orch worker` started with ``token`` and ``flags``, on a free port of ``host``: refused
    at once (its exit code and words), or serving, then stopped (exit 0)."""
    ready = folder / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "worker", "--host", host, "--port", "0",
         "--discovery", "off", "--cache-dir", str(folder / "cache"), "--ready-file",
         str(ready), *flags], env={**os.environ, "ORCH_WORKER_TOKEN": token, "COLUMNS": "200"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    served = ready.exists()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, 0 if served else proc.returncode, out, err)


def workers_under(folder: Path) -> list[psutil.Process]:
    """The running ``orch worker`` processes whose cache folder lies under ``folder``,
    whoever their parent is now: a worker its orchestrator leaked has been re-parented by
    the time the orchestrator has exited, so it is no child of this process."""
    folder = folder.resolve()
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE or not _runs_orch_worker(cmdline):
            continue
        cache = _option(cmdline, "--cache-dir")
        if cache is not None and Path(cache).resolve().is_relative_to(folder):
            found.append(proc)
    return found


def assert_no_workers_left(folder: Path, timeout: float = 10.0) -> None:
    """Fail naming them if workers with their cache under ``folder`` still run after
    ``timeout`` seconds (the time a worker takes to notice that its parent has died)."""
    left: list[psutil.Process] = []

    def none_left() -> bool:
        left[:] = workers_under(folder)
        return not left

    try:
        wait_until(none_left, timeout, f"the workers under {folder} to exit")
    except WaitTimeout:
        raise WaitTimeout(f"{len(left)} worker(s) still running {timeout:g} s later: "
                          + "; ".join(f"pid {p.pid}: {' '.join(p.info['cmdline'])}"
                                      for p in left)) from None


def _runs_orch_worker(cmdline: Sequence[str]) -> bool:
    """``python -m orchestrator.cli worker ...`` or ``orch worker ...``."""
    for i, arg in enumerate(cmdline[:3]):
        if arg == "orchestrator.cli" or Path(arg).name == "orch":
            return cmdline[i + 1:i + 2] == ["worker"]
    return False


def _option(cmdline: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(cmdline):
        if arg == name and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None
