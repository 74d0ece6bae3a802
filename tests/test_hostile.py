"""Hostile input survived: fuzzed GGUF headers and RPC messages (bounded here; the long
run is ``bench/fuzz.py``), and a refusal costs one log line, a few per peer a minute."""

from __future__ import annotations

import logging
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchcore.errors import GGUFError
from orchcore.facts import read_model_facts
from orchcore.modelgen import ModelSpec
from orchcore.shard import KEY_LAYER_END, LayerRange, write_shard
from orchcore.wire.channel import connect
from orchestrator.cluster.local import LocalCluster
from orchestrator.settings import OrchSettings
from testkit.fuzzing import (
    Tally,
    call_raw,
    check_header,
    keep_home,
    load_stage,
    methods,
    mutate,
    seeds,
)
from testkit.models import generated_model
from worker.rejects import RejectLog, peer_host

HEADER_BYTES = 64 << 10  # the start of the real model: magic, counts, keys, tensor infos


@pytest.fixture(scope="module")
def headers(smollm2_path, tmp_path_factory) -> list[bytes]:
    """The start of the real model, and a whole small model and a shard of it (their
    headers fit: every count, key and tensor record is in reach of a mutation)."""
    folder = tmp_path_factory.mktemp("headers")
    small = generated_model(ModelSpec(n_layers=2, n_vocab=300), "small.gguf")
    shard = write_shard(small, LayerRange(1, 2), folder / "shard.gguf").path
    with smollm2_path.open("rb") as f:
        return [f.read(HEADER_BYTES), small.read_bytes(), shard.read_bytes()]


def test_mutated_headers_are_read_or_refused_with_a_typed_error(headers, tmp_path):
    @settings(max_examples=300, deadline=2000, derandomize=True)
    @given(seed=st.integers(0, 2**32 - 1))
    def one(seed: int) -> None:  # (the headers stay out of hypothesis' reports)
        rng = random.Random(seed)
        check_header(mutate(rng.choice(headers), rng), tmp_path, "m.gguf")

    one()


@settings(max_examples=100, deadline=2000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096))
def test_random_bytes_are_refused_as_gguf(tmp_path, data):
    check_header(data, tmp_path, "r.gguf")


def test_a_header_declaring_a_huge_count_is_refused_before_allocating(headers, tmp_path):
    """The tensor count, the key count and the first key's length, set near 2**63."""
    header = headers[1]
    for at in (8, 16, 24):
        data = header[:at] + b"\xff" * 7 + b"\x7f" + header[at + 8:]
        (tmp_path / "big.gguf").write_bytes(data)
        started = time.monotonic()
        with pytest.raises(GGUFError):
            read_model_facts(tmp_path / "big.gguf")
        assert time.monotonic() - started < 2


@pytest.fixture(scope="module")
def hostile_worker(tmp_path_factory):
    with LocalCluster(1, tmp_path_factory.mktemp("hostile"), threads_per_worker=1) as workers:
        yield workers


def test_every_rpc_survives_random_and_mutated_messages(hostile_worker, tmp_path):
    address, token = hostile_worker.addresses[0], hostile_worker.token
    sha = load_stage(address, token, OrchSettings(), tmp_path)  # a live stage to reach
    link = connect(address, token, allow_plaintext=False, timeout_s=10)
    rng = random.Random(7)
    tally = Tally()
    valid = seeds(token, sha)
    for method in methods():
        for n in range(40):
            if n % 4 == 0:
                body = rng.randbytes(rng.randint(0, 512))
            else:
                body = mutate(rng.choice(valid[method.name]), rng)
            bodies = [keep_home(method, body, token)]
            if method.request_streaming:  # a valid first message, then the hostile one
                bodies.insert(0, keep_home(method, rng.choice(valid[method.name]), token))
            deadline = 2.0 if method.name == "Results" else 20.0
            call_raw(link.channel, method, bodies, token if n % 8 else None, deadline, tally)
    link.close()
    hostile_worker.check_alive()
    assert tally.findings == []
    assert tally.calls == 40 * len(methods())
    assert tally.codes.get("INVALID_ARGUMENT", 0) > 50  # the refusals did happen


def test_garbage_costs_a_few_log_lines_not_a_traceback_each(tmp_path):
    with LocalCluster(1, tmp_path, threads_per_worker=1) as workers:
        link = connect(workers.addresses[0], workers.token, allow_plaintext=False,
                       timeout_s=10)
        tally = Tally()
        rng = random.Random(3)
        info = next(m for m in methods() if m.name == "LoadShard")
        for _ in range(210):
            call_raw(link.channel, info, [rng.randbytes(64)], workers.token, 10.0, tally)
        link.close()
    log = (workers.log_dir / "worker-0.log").read_text()  # all of it: the worker has exited
    assert tally.findings == [] and tally.codes.get("INVALID_ARGUMENT", 0) > 150
    assert "Traceback" not in log
    assert len(log.splitlines()) <= 10, log


def test_the_reject_log_keeps_a_few_lines_per_peer_and_counts_the_rest(caplog):
    now = [0.0]
    rejects = RejectLog(lines=3, window_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="worker.rejects"):
        for i in range(100):
            rejects.note("ipv4:10.0.0.2:4000", f"garbage {i}")
        rejects.note("ipv6:[fe80::1]:4000", "other peer")
        now[0] = 61.0
        rejects.note("ipv4:10.0.0.2:4001", "after the window")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == [f"refused a call from 10.0.0.2: garbage {i}" for i in range(3)]
    assert "refused a call from fe80::1: other peer" in lines
    assert any(line.startswith("97 more calls from 10.0.0.2 were refused") for line in lines)
    assert lines[-1] == "refused a call from 10.0.0.2: after the window"
    assert len(lines) == 6 and rejects.total == 102


def test_peer_hosts():
    assert peer_host("ipv4:127.0.0.1:5000") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:5000") == "::1"
    assert peer_host("unix:/run/x") == "unix:/run/x"


def test_a_shard_missing_a_layer_key_is_refused_as_corrupt(headers, tmp_path):
    """Found by the long fuzz run: a shard naming its first layer but not its last."""
    shard = headers[2]
    assert shard.count(KEY_LAYER_END.encode()) == 1
    check = check_header(shard.replace(KEY_LAYER_END.encode(), KEY_LAYER_END[:-1].encode()
                                       + b"X"), tmp_path, "s.gguf")
    assert check == "refused"
