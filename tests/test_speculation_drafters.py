"""Drafters: prompt lookup (pure), a draft model kept in step with the context by rollback,
the early-exit drafter (the target's first layers and head), and the vocabulary check that
refuses a draft model of another family, naming the difference."""

from __future__ import annotations

import pytest

from orchcore.engine import EngineConfig
from orchcore.errors import InvalidSettingError
from orchcore.modelgen import preset, write_model
from orchcore.speculation.drafters import DraftModel, PromptLookup, open_early_exit
from orchcore.speculation.vocab import (
    DraftVocabularyError,
    VocabFacts,
    open_draft_model,
    read_vocab_facts,
    vocab_mismatch,
)
from testkit.models import generated_model
from testkit.reference import ReferenceModel

CONFIG = EngineConfig(threads=1, context_tokens=64, max_sessions=1, batch_tokens=16)


# --- prompt lookup -----------------------------------------------------------------------

def test_lookup_prefers_the_longest_suffix():
    # "2 3" occurred before "7 8", but the 3-gram "1 2 3" matches only the first place
    context = [1, 2, 3, 7, 8, 9, 2, 3, 5, 5, 1, 2, 3]
    assert PromptLookup(max_ngram=3).propose(context, 3).tokens == (7, 8, 9)
    assert PromptLookup(max_ngram=2).propose(context, 3).tokens == (5, 5, 1), "latest 2-gram"


def test_lookup_caps_at_k_and_copies_on_over_its_own_copy_at_the_end():
    context = [4, 5, 6, 4, 5]
    assert PromptLookup().propose(context, 1).tokens == (6,)
    assert PromptLookup().propose(context, 8).tokens == (6, 4, 5, 6, 4, 5, 6, 4), \
        "a text that repeats every 3 tokens goes on repeating"
    assert PromptLookup().propose([9, 9], 3).tokens == (9, 9, 9)


def test_lookup_without_a_match_proposes_nothing():
    assert PromptLookup().propose([1, 2, 3, 4], 4).tokens == ()
    assert PromptLookup(min_ngram=2).propose([1, 2, 1], 4).tokens == (), "1-gram not enough"
    assert PromptLookup().propose([1], 4).tokens == ()
    assert PromptLookup().propose([1, 1], 0).tokens == ()


def test_lookup_settings_are_checked():
    with pytest.raises(InvalidSettingError, match="min_ngram <= max_ngram"):
        PromptLookup(max_ngram=1, min_ngram=2)


# --- vocabulary ----------------------------------------------------------------------------

def facts(**changes) -> VocabFacts:
    base = VocabFacts("gpt2", "smollm", (b"a", b"b", b"c"), 1, 2)
    return base._replace(**changes)


@pytest.mark.parametrize("changes, problem", [
    ({"model": "llama"}, "tokenizer 'gpt2' (target) vs 'llama' (draft)"),
    ({"pre": None}, "pre-tokenizer 'smollm' (target) vs None (draft)"),
    ({"pieces": (b"a", b"b")}, "token count 3 (target) vs 2 (draft)"),
    ({"eos": 0}, "EOS id 2 (target) vs 0 (draft)"),
    ({"pieces": (b"a", b"x", b"c")}, "token 1 is b'b' (target) vs b'x' (draft)"),
])
def test_vocab_mismatch_names_the_first_difference(changes, problem):
    assert vocab_mismatch(facts(), facts(**changes)) == problem
    assert vocab_mismatch(facts(), facts()) is None


def test_a_draft_model_of_another_family_is_refused(smollm2_path, tmp_path):
    small = write_model(tmp_path / "small.gguf", preset("tiny-llama-gqa", n_layers=1))
    with pytest.raises(DraftVocabularyError, match=r"small.gguf cannot draft.*tokenizer "
                                                   r"'gpt2' \(target\) vs 'llama'.*same family"):
        open_draft_model(small, read_vocab_facts(smollm2_path), CONFIG)
    wider = write_model(tmp_path / "wider.gguf", preset("tiny-llama-gqa", n_vocab=400))
    with pytest.raises(DraftVocabularyError, match=r"token count 400 .* vs 384"):
        open_draft_model(small, read_vocab_facts(wider), CONFIG)


def test_real_vocab_facts(smollm2_path):
    vocab = read_vocab_facts(smollm2_path)
    assert (vocab.model, len(vocab.pieces)) == ("gpt2", 49152), vocab[:2]
    assert vocab.pieces[vocab.eos] == b"<|im_end|>", vocab.pieces[vocab.eos]


# --- draft model ---------------------------------------------------------------------------

def test_draft_model_follows_the_context_through_rejections(tmp_path):
    """Proposals equal the draft model's own greedy continuation, also after the context
    took another turn than the previous drafts (its KV cache rolled back)."""
    target = write_model(tmp_path / "target.gguf", preset("tiny-llama-gqa", n_layers=3))
    small = write_model(tmp_path / "small.gguf", preset("tiny-llama-gqa", n_layers=1, seed=5))
    ref = ReferenceModel(small, n_ctx=64, threads=1)
    try:
        drafter = open_draft_model(small, read_vocab_facts(target), CONFIG)
        context = [1, 17, 300, 42, 99]
        for turn in range(4):
            proposal = drafter.propose(context, 4).tokens
            ref.rollback(0)
            greedy, _ = ref.greedy(context, 4)
            assert list(proposal) == greedy, (turn, context, proposal, greedy)
            # the target kept two drafts and then chose a token of its own
            context = [*context, *proposal[:2], (proposal[2] + 7) % 384]
        assert drafter.propose(context, 100).tokens, "capped at the context room"
        assert len(drafter.propose(list(range(1, 65)), 4).tokens) == 0, "no room left"
        drafter.close()
    finally:
        ref.close()


def test_draft_model_must_be_whole(tmp_path):
    from orchcore.engine import StageEngine
    from orchcore.shard import LayerRange, write_shard

    model = write_model(tmp_path / "m.gguf", preset("tiny-llama-gqa", n_layers=2))
    shard = write_shard(model, LayerRange(0, 1), tmp_path / "s.gguf")
    with StageEngine(shard.path, CONFIG) as engine, pytest.raises(InvalidSettingError,
                                                                  match="whole model"):
        DraftModel(engine)


def test_early_exit_drafts_what_the_first_layers_and_the_head_choose(tmp_path):
    """The exit shard of a generated model drafts as the same model generated with K layers
    (same weights), greedily, also after rejections."""
    target = generated_model(preset("tiny-llama-gqa"), "tied.gguf")  # 4 layers
    shorter = generated_model(preset("tiny-llama-gqa", n_layers=2), "tied.gguf")
    drafter = open_early_exit(target, 2, tmp_path / "exit.gguf", CONFIG)
    ref = ReferenceModel(shorter, n_ctx=64, threads=1)
    try:
        assert drafter.engine.role.exit and drafter.engine.n_vocab == 384
        context = [1, 17, 300, 42, 99]
        for turn in range(3):
            proposal = drafter.propose(context, 4).tokens
            ref.rollback(0)
            assert list(proposal) == ref.greedy(context, 4)[0], (turn, context, proposal)
            context = [*context, proposal[0], (proposal[1] + 7) % 384]
    finally:
        drafter.close()
        ref.close()
