"""Workers are shared, and say so: a second orchestrator asking for the very same stages
shares them, a different model is refused as busy (naming the holder), --force takes over,
and a stage stays loaded until its last holder lets go."""

from __future__ import annotations

import time

import pytest

from orchcore import modelgen
from orchcore.errors import WorkerBusyError
from orchestrator.cluster.client import WorkerClient
from orchestrator.cluster.local import LocalCluster
from orchestrator.pipeline.deploy import LogProgress
from orchestrator.settings import OrchSettings
from testkit.cluster import GREEDY, greedy_tokens, open_model, worker_server
from testkit.models import generated_model
from testkit.reference import ReferenceModel

PROMPT = "The capital of France is Paris. The capital of Germany is"


def test_two_orchestrators_share_the_same_model_and_a_third_is_told_busy(smollm2_path,
                                                                         tmp_path, threads):
    ref = ReferenceModel(smollm2_path, threads=threads)
    prompt = ref.tokenize(PROMPT)
    want, _ = ref.greedy(prompt, 8)
    ref.close()
    other = generated_model(modelgen.preset("tiny-llama-gqa"), "other.gguf")
    with LocalCluster(2, tmp_path / "w", threads_per_worker=1) as workers:
        args = (workers.addresses, workers.token)
        with open_model(smollm2_path, *args, tmp_path / "a") as first, \
                open_model(smollm2_path, *args, tmp_path / "b") as second:
            assert second.deployment.shared and not first.deployment.shared
            assert second.path.pipeline_id == first.path.pipeline_id
            a = first.stream(first.new_session(GREEDY), prompt, 8)
            b = second.stream(second.new_session(GREEDY), prompt, 8)
            got_a, got_b = [], []
            for _ in range(8):  # both in flight on the same stages at once
                got_a.append(next(a))
                got_b.append(next(b))
            assert got_a == want and got_b == want
            with pytest.raises(WorkerBusyError, match=r"busy: it runs layers \[\d+, \d+\) of "
                                                      r"SmolLM2-135M.*for 2 other orchestrators"), \
                    open_model(other, *args, tmp_path / "c"):
                pass
            info = _info(workers.addresses[0], workers.token)
            assert len(info.loaded.holders) == 2 and info.loaded.model.startswith("SmolLM2")
        assert _info(workers.addresses[0], workers.token).loaded is None  # all left

        with open_model(smollm2_path, *args, tmp_path / "a"), \
                open_model(other, *args, tmp_path / "c", force=True) as taker:
            assert greedy_tokens(taker, [1, 2, 3], 2)
            assert _info(workers.addresses[0], workers.token).loaded.model == "other.gguf"


def _info(address: str, token: str):
    client = WorkerClient(address, token, OrchSettings.load())
    try:
        return client.info()
    finally:
        client.close()


def test_leases_lapse_when_the_orchestrator_is_gone(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setattr("worker.leases.LEASE_S", 1.0)  # in-process workers below
    other = generated_model(modelgen.preset("tiny-llama-gqa"), "other.gguf")
    with worker_server(tmp_path / "w0") as a, worker_server(tmp_path / "w1") as b, \
            open_model(smollm2_path, [a, b], None, tmp_path / "x", lease_renew_s=25):
        with pytest.raises(WorkerBusyError):
            open_model(other, [a, b], None, tmp_path / "y").__enter__()
        time.sleep(1.5)  # no renewal within the (shortened) lease: it has lapsed
        with open_model(other, [a, b], None, tmp_path / "y") as taker:
            assert greedy_tokens(taker, [1, 2, 3], 2)


class _SlowLoads(LogProgress):
    """Each stage takes longer to load than a (shortened) lease lasts: a large model."""

    def task(self, description: str, total: int | None, *, alone: bool = True):
        if description.startswith("loading layers"):
            time.sleep(1.5)
        return super().task(description, total, alone=alone)


def test_stages_loaded_first_keep_their_lease_while_the_others_load(smollm2_path, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setattr("worker.leases.LEASE_S", 1.0)  # in-process workers below
    with worker_server(tmp_path / "w0") as a, worker_server(tmp_path / "w1") as b, \
            open_model(smollm2_path, [a, b], None, tmp_path / "x", progress=_SlowLoads(),
                       lease_renew_s=0.3) as model:
        for address in (a, b):
            client = WorkerClient(address, None, model.settings)
            try:
                assert client.renew(model.path.pipeline_id, model.deployment.holder, 2.0), \
                    f"{address} let our lease lapse while the other stage was loading"
            finally:
                client.close()
        assert greedy_tokens(model, [1, 2, 3], 2)
