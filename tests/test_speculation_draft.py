"""``--speculate draft:MODEL``: a draft model on the orchestrator drafts every pass, the
workers verify it. Greedy answers equal the unsplit target fed the same verification
batches, and every pass carries the draft model's own greedy proposals (the ring drafts
nothing for such a session). A draft model of another vocabulary, or none at the path,
is refused in one line before anything loads. The real 135M requantized to Q4_0 drafts
for the shipped Q4_1.

The generated target and draft share their weights' seed, so the draft's 2 layers are the
target's first 2: a cheap drafter that agrees with the target often, not always.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from orchcore.config import EngineConfig
from orchcore.engine import StageEngine
from orchcore.modelgen import preset
from orchcore.speculation.drafters import DraftModel
from orchcore.speculation.mode import DEFAULT_K, SpeculationMode, parse_mode
from testkit.cluster import GREEDY, open_model, worker_server
from testkit.models import generated_model, requantized_model
from tests.test_speculation_pipeline import COPY, answer, assert_unsplit_agrees

PROMPT = [1, 17, 300, 42, 99, 17, 300, 42, 5, 17, 300]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft")
    with worker_server(root / "a") as a, worker_server(root / "b") as b:
        yield [a, b]


@pytest.fixture(scope="module")
def target():
    return generated_model(preset("tiny-llama-gqa", n_layers=4), "target.gguf")


@pytest.fixture(scope="module")
def draft():
    return generated_model(preset("tiny-llama-gqa", n_layers=2), "draft.gguf")


def test_draft_mode_is_parsed_with_the_model_as_written():
    assert parse_mode("draft:Models/Small:v2.gguf") == SpeculationMode(
        "draft", DEFAULT_K, "Models/Small:v2.gguf")
    assert parse_mode("DRAFT: smollm2-135m ") == SpeculationMode("draft", DEFAULT_K,
                                                                 "smollm2-135m")


def own_proposals(draft_path, session) -> list[tuple[int, ...]]:
    """What a fresh draft model proposes for each of ``session``'s passes."""
    engine = StageEngine(draft_path, EngineConfig(context_tokens=512, max_sessions=1,
                                                  batch_tokens=64, threads=1))
    drafter = DraftModel(engine)
    try:
        prompt = list(session.prompt)
        return [drafter.propose([*prompt, *session.generated[:p.start - len(prompt) + 1]],
                                p.drafted).tokens if p.drafted else ()
                for p in session.passes]
    finally:
        drafter.close()


@pytest.mark.parametrize("ring", [True, False], ids=["ring-on", "ring-off"])
def test_greedy_draft_model_speculation_equals_the_unsplit_target(workers, target, draft,
                                                                  tmp_path, ring, capsys):
    with open_model(target, workers, None, tmp_path, token_ring=ring,
                    speculate=f"draft:{draft}") as model:
        tokens, session, stats = answer(model, PROMPT, GREEDY, n=48)
        held = model.speculator.draft.engine.session_count
    drafted = [p.drafted for p in session.passes]
    kept = [len(p.added) - 1 for p in session.passes]
    assert sum(kept) > 0 and any(k < d for k, d in zip(kept, drafted, strict=True)), \
        f"passes should keep some drafts and reject some: drafted {drafted}, kept {kept}"
    assert [p.tokens[1:] for p in session.passes] == own_proposals(draft, session), \
        "a pass carried drafts that are not the draft model's"
    assert held == 0, "the answer's draft cache was not freed"
    assert stats.speculation.draft_s > 0, "the drafting time was not counted"
    assert_unsplit_agrees(target, session, tokens)
    with capsys.disabled():
        print(f"\ndraft model, ring {ring}: {len(tokens)} tokens in "
              f"{stats.speculation.passes + 1} passes ({sum(kept)}/{sum(drafted)} drafts "
              f"kept)")


def test_sessions_in_threads_draft_from_one_draft_model(workers, target, draft, tmp_path):
    """Two answers drafting at once (as orch serve runs them): each equals the same answer
    alone, and both draft caches are freed."""
    with open_model(target, workers, None, tmp_path, max_sessions=2,
                    speculate=f"draft:{draft}") as model:
        alone, _, _ = answer(model, PROMPT, GREEDY, n=48)
        results: dict[int, list[int]] = {}
        threads = [threading.Thread(target=lambda i=i: results.update(
            {i: answer(model, PROMPT, GREEDY, n=48)[0]})) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        held = model.speculator.draft.engine.session_count
    assert results == {0: alone, 1: alone}
    assert held == 0


def test_the_real_135m_requantized_drafts_for_the_shipped_one(smollm2_path, workers,
                                                             tmp_path, capsys):
    """SmolLM2-135M requantized to Q4_0 drafting for the shipped Q4_1, over 2 workers."""
    draft_path = requantized_model(smollm2_path)
    with open_model(smollm2_path, workers, None, tmp_path, speculate=f"draft:{draft_path}"
                    ) as model:
        prompt = model.encode([{"role": "user", "content": COPY}])
        tokens, session, stats = answer(model, prompt)
    kept = sum(len(p.added) - 1 for p in session.passes)
    assert kept > 0, "the requantized model's drafts were never kept"
    assert_unsplit_agrees(smollm2_path, session, tokens)
    with capsys.disabled():
        print(f"\n135M Q4_0 drafting for Q4_1: {len(tokens)} tokens in "
              f"{stats.speculation.passes + 1} passes ({kept}/{stats.speculation.drafted} "
              f"drafts kept)")


def orch_run(model, *args: str, cache) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(model), "hi",
                           "--max-tokens", "4", *args],
                          env=dict(os.environ, ORCH_CACHE_DIR=str(cache), COLUMNS="200"),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("draft_spec", "says"), [
    ({"n_vocab": 320}, "token count 384 (target) vs 320 (draft)"),
    (None, "the draft model of --speculate draft:MODEL: no such model file"),
])
def test_a_draft_model_that_cannot_draft_is_refused_in_one_line(target, tmp_path,
                                                                 draft_spec, says):
    """Refused before its weights load and before any worker starts, without a trace."""
    path = (tmp_path / "no-such-draft.gguf" if draft_spec is None else
            generated_model(preset("tiny-llama-gqa", n_layers=1, **draft_spec), "other.gguf"))
    done = orch_run(target, "--speculate", f"draft:{path}", cache=tmp_path)
    assert done.returncode == 1, done.stderr
    assert says in done.stderr.replace("\n", " "), done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "local").exists()  # no local worker was started


@pytest.mark.parametrize(("mode", "says"), [
    ("early:4", "1 to 3 for target.gguf (4 layers)"),
    ("early:x", "K of early:K is how many of the model's first layers draft"),
])
def test_an_early_exit_the_model_cannot_make_is_refused_in_one_line(target, tmp_path, mode,
                                                                    says):
    done = orch_run(target, "--speculate", mode, cache=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert says in done.stderr.replace("\n", " "), done.stderr
    assert not (tmp_path / "local").exists()  # no local worker was started


def test_early_exit_drafts_with_the_targets_first_layers(workers, target, tmp_path, capsys,
                                                        monkeypatch):
    """`early:2`: the target's first 2 of 4 layers with its head draft on the orchestrator;
    every pass carries the exit shard's own greedy proposals, and the answer equals the
    unsplit target fed the same batches."""
    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path / "cache"))  # the exit shard's home
    assert parse_mode("early:2") == SpeculationMode("early", DEFAULT_K, exit_layers=2)
    with open_model(target, workers, None, tmp_path, speculate="early:2") as model:
        tokens, session, stats = answer(model, PROMPT, GREEDY, n=48)
        shard = model.speculator.draft.path
    assert shard.name.endswith(".exit2.gguf") and shard.parent.name == "exit"
    assert [p.tokens[1:] for p in session.passes] == own_proposals(shard, session)
    assert sum(len(p.added) - 1 for p in session.passes) > 0, "no draft was ever kept"
    assert_unsplit_agrees(target, session, tokens)
    with capsys.disabled():
        print(f"\nearly:2 of 4: {stats.speculation.accepted}/{stats.speculation.drafted} "
              f"drafts kept in {stats.speculation.passes} passes")
