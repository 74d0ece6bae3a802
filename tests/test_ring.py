"""The token ring: the last stage feeds each sampled token to stage 0 itself; the
orchestrator only listens, and a stop it finds ends the session on every stage."""

from __future__ import annotations

import logging

import pytest

from orchestrator.pipeline.session import Finished, TextPiece
from testkit.cluster import GREEDY, greedy_tokens, open_model, worker_server
from testkit.waiting import wait_until

PROMPT = "Once upon a time, in a small village,"


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("ring")
    with worker_server(root / "a") as a, worker_server(root / "b") as b:
        yield [a, b]


def _sent_by_orchestrator(model) -> list:
    """Record every chunk the orchestrator puts on its stream into stage 0."""
    sent = []
    forward = model.path._forward
    original = forward.send
    forward.send = lambda msg: (sent.append(msg), original(msg))[1]
    return sent


@pytest.mark.parametrize("workers", [1, 2])
def test_the_orchestrator_sends_only_the_prompt_and_the_answer_equals_step_by_step(
        smollm2_path, two_workers, tmp_path, workers):
    addresses = two_workers[:workers]
    with open_model(smollm2_path, addresses, None, tmp_path, token_ring=False) as model:
        prompt = model.encode(PROMPT)
        stepwise = greedy_tokens(model, prompt, 24)
    with open_model(smollm2_path, addresses, None, tmp_path) as model:
        sent = _sent_by_orchestrator(model)
        assert greedy_tokens(model, prompt, 24) == stepwise
    computed = [m for m in sent if not m.end_session]
    assert len(computed) == 1 and computed[0].ring_left == 23, computed  # the prompt only
    assert [m.end_session for m in sent] == [False, True]


def test_a_stop_string_ends_the_ring_and_the_workers_drop_what_was_in_flight(
        smollm2_path, two_workers, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    with open_model(smollm2_path, two_workers, None, tmp_path) as model:
        full = "".join(e.text for e in model.generate(PROMPT, GREEDY, max_tokens=40,
                                                      chat=False)
                       if isinstance(e, TextPiece))
        words = full.split()
        assert len(words) > 6, full
        stop = words[3]
        events = list(model.generate(PROMPT, GREEDY, stops=[stop], max_tokens=40,
                                     chat=False))
        text = "".join(e.text for e in events if isinstance(e, TextPiece))
        assert events[-1].reason == "stop" and full.startswith(text) and stop not in text
        # The ring ran on past the stop for at most a step; the workers ended the session
        # and dropped its late chunk, so the next answer finds its slots free.
        again = list(model.generate(PROMPT, GREEDY, max_tokens=40, chat=False))
        assert "".join(e.text for e in again if isinstance(e, TextPiece)) == full
        # The end of the last answer reaches the last stage a moment after it is read.
        wait_until(lambda: [c.info().loaded.sessions for c in model.path.clients] == [0, 0],
                   20, "both stages to hold no session")
    assert not [r for r in caplog.records if "stage" in r.name], caplog.text
    assert isinstance(events[-1], Finished)
