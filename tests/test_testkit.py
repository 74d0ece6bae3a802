"""The test helpers themselves: waiting with a deadline, the test model cache, and the
temporary folders a passing test leaves behind (none)."""

from __future__ import annotations

import time

import pytest

from orchcore.modelgen import preset
from testkit import models
from testkit.models import generated_model
from testkit.waiting import WaitTimeout, wait_until

SPEC = preset("tiny-llama-gqa", n_layers=2)


def test_wait_until_returns_the_first_true_value():
    calls = iter([0, [], "ready"])
    assert wait_until(lambda: next(calls), 5, "the third call", interval=0) == "ready"


def test_wait_until_fails_naming_what_it_waited_for():
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"waited 0.2 s for the moon; last saw \[\]"):
        wait_until(list, 0.2, "the moon")
    assert 0.2 <= time.monotonic() - started < 5


def test_wait_until_asks_once_more_at_the_deadline():
    give_up = time.monotonic() + 0.3
    assert wait_until(lambda: time.monotonic() >= give_up, 0.3, "the deadline", interval=10)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_TEST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_generated_model_is_written_once_and_reused(cache):
    first = generated_model(SPEC, "m.gguf")
    assert first.is_relative_to(cache) and first.name == "m.gguf"
    written = first.stat().st_mtime_ns
    again = generated_model(SPEC, "m.gguf")
    assert again == first and again.stat().st_mtime_ns == written, "written a second time"
    assert generated_model(preset("tiny-llama-gqa", n_layers=2, seed=1), "m.gguf") != first
    assert generated_model(SPEC, "other.gguf") != first


def test_a_split_set_is_cached_under_its_first_file(cache):
    first = generated_model(SPEC, "set.gguf", split_max_tensors=7)
    assert first.name.startswith("set-00001-of-"), first
    assert generated_model(SPEC, "set.gguf", split_max_tensors=7) == first
    assert len(list(first.parent.glob("set-*.gguf"))) > 1


def test_a_half_written_model_is_made_again(cache):
    first = generated_model(SPEC)
    whole = first.read_bytes()
    (first.parent / "ready").unlink()  # as a run killed while writing leaves it
    first.write_bytes(whole[:100])
    assert generated_model(SPEC).read_bytes() == whole


def test_the_least_recently_used_models_go_when_the_cache_is_full(cache, monkeypatch):
    one = generated_model(SPEC, "one.gguf")
    size = one.stat().st_size
    two = generated_model(SPEC, "two.gguf")
    generated_model(SPEC, "one.gguf")  # used again: now two is the older
    monkeypatch.setattr(models, "LIMIT_BYTES", int(2.5 * size))
    three = generated_model(SPEC, "three.gguf")
    assert one.exists() and three.exists(), "the newest models were evicted"
    assert not two.exists(), "the least recently used model was kept over the limit"


def test_a_passing_tests_temporary_folder_is_deleted(request):
    assert request.config.getini("tmp_path_retention_policy") == "failed"
