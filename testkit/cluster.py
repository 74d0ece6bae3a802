"""Real workers for tests: a worker gRPC server in a thread of this process, and a model
opened on a list of workers through the product's own session API."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from orchcore.facts import read_model_facts
from orchcore.sampling import SamplingParams
from orchestrator.pipeline.connected import Cluster
from orchestrator.pipeline.deploy import DeployProgress
from orchestrator.pipeline.session import GenerationStats, RunningModel
from orchestrator.planning.plan import make_plan
from orchestrator.settings import OrchSettings
from orchestrator.text.tokenizer import Tokenizer
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
    for _ in range(200):
        if ready.exists():
            break
        time.sleep(0.05)
    try:
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
    with ``measure``, planned on the workers' probed speeds."""
    config = OrchSettings.load(**{"context_tokens": 512, **settings})
    facts = read_model_facts(model)
    cluster = Cluster.connect(addresses, token, config, alive)
    try:
        if measure:
            cluster.measure_speeds(facts)
        plan = make_plan(facts, cluster.devices, config.plan_options(use_all=True))
        with Tokenizer.from_gguf(model) as tokenizer, \
                cluster.open(plan, facts, tokenizer, progress, force=force) as opened:
            yield opened
    finally:
        cluster.close()


def greedy_tokens(model: RunningModel, prompt: Sequence[int], n: int,
                  stats: GenerationStats | None = None) -> list[int]:
    return list(model.stream(model.new_session(GREEDY), prompt, n, stats))
