"""Exit shards: the first K layers of a model with its final norm, lm head and tokenizer,
written as a whole model of K layers (the early-exit drafter, docs/speculation.md).

A generated model's weights depend on the tensor's name and the seed alone, so the same
spec with K layers is the exit shard's model: the two must hold the same tensors and give
the same logits, bit for bit. On the real 135M the exit shard opens on its own (its own
tokenizer) and drafts in a ``DraftModel``.
"""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
from gguf import Keys

from orchcore.engine import EngineConfig, StageEngine
from orchcore.errors import CorruptGGUFError, LayerRangeError
from orchcore.facts import OUTPUT_NORM, TOKEN_EMBD, read_model_facts
from orchcore.modelgen import preset
from orchcore.shard import (
    KEY_EXIT,
    KEY_INPUT_FED,
    KEY_INPUT_OFFSET,
    KEY_LAYER_END,
    KEY_LAYER_START,
    KEY_SOURCE_LAYERS,
    LayerRange,
    exit_layout,
    shard_layout,
    write_exit_shard,
    write_shard,
)
from orchcore.speculation.drafters import DraftModel
from orchcore.stagerole import StageRole
from testkit.models import generated_model
from testkit.reference import ReferenceModel

CONFIG = EngineConfig(threads=1, context_tokens=64, max_sessions=1, batch_tokens=16)
TOKENS = [1, 17, 300, 42, 99, 5, 8, 250]  # longer than arch-gemma3's sliding window (4)


def _tensors(reader: gguf.GGUFReader) -> dict[str, bytes]:
    return {t.name: t.data.tobytes() for t in reader.tensors}


def _logits(path, tokens=TOKENS) -> np.ndarray:
    with StageEngine(path, CONFIG) as engine:
        return engine.forward("s", range(len(tokens)), tokens=tokens, all_logits=True)


@pytest.mark.parametrize(("name", "k"), [
    ("tiny-llama-mha-untied", 2),  # output.weight of its own
    ("tiny-llama-gqa", 1),  # tied: token_embd is the head
    ("arch-gemma3", 5),  # sliding-window flags of layers 0..4, input scale
    ("tiny-qwen3", 3),
])
def test_exit_shard_is_the_model_with_k_layers(name, k, tmp_path):
    source = generated_model(preset(name), "m.gguf")
    shorter = generated_model(preset(name, n_layers=k), "m.gguf")
    shard = write_exit_shard(source, k, tmp_path / "exit.gguf")
    ours, theirs = gguf.GGUFReader(shard.path), gguf.GGUFReader(shorter)
    assert _tensors(ours) == _tensors(theirs)
    for key, field in theirs.fields.items():  # every key, the tokenizer's too
        if not key.startswith("GGUF."):
            assert ours.fields[key].contents() == field.contents(), key
    assert np.array_equal(_logits(shard.path), _logits(shorter)), "logits differ"


def test_exit_shard_says_what_it_is(tmp_path):
    source = generated_model(preset("tiny-llama-gqa"), "tied.gguf")  # 4 layers
    shard = write_exit_shard(source, 2, tmp_path / "exit.gguf")
    reader = gguf.GGUFReader(shard.path)

    def value(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    assert (value(KEY_EXIT), value(KEY_LAYER_START), value(KEY_LAYER_END),
            value(KEY_SOURCE_LAYERS)) == (True, 0, 2, 4)
    assert value(Keys.LLM.BLOCK_COUNT.format(arch="llama")) == 2
    assert value(KEY_INPUT_FED) is None and value(KEY_INPUT_OFFSET) is None
    role = StageRole.of(read_model_facts(shard.path))
    assert role.exit and role.is_first and role.is_last and (role.start, role.end) == (0, 2)
    first = write_shard(source, LayerRange(0, 2), tmp_path / "first.gguf")
    role = StageRole.of(read_model_facts(first.path))
    assert not role.exit and not role.is_last, "a first stage is no exit shard"
    assert not shard_layout(read_model_facts(source), LayerRange(0, 2)).exit


def test_exit_shards_are_refused_outside_the_first_layers():
    facts = read_model_facts(generated_model(preset("tiny-llama-gqa"), "tied.gguf"))
    for k in (0, 4, 5):
        with pytest.raises(LayerRangeError, match=r"\[0, "):
            exit_layout(facts, k)
    with pytest.raises(LayerRangeError, match=r"exit shard .*got \[1, 3\)"):
        shard_layout(facts, LayerRange(1, 3), exit=True)
    assert exit_layout(facts, 3).is_last and exit_layout(facts, 3).vocab_size == 384
    meta = {KEY_LAYER_START: 1, KEY_LAYER_END: 3, KEY_SOURCE_LAYERS: 4, KEY_EXIT: True}
    with pytest.raises(CorruptGGUFError, match=r"exit shard holds layers \[0, K\)"):
        StageRole.of(dataclasses.replace(facts, metadata=meta))


def test_real_exit_shard_opens_on_its_own_and_drafts(smollm2_path, tmp_path):
    facts = read_model_facts(smollm2_path)
    k = 15
    shard = write_exit_shard(smollm2_path, k, tmp_path / "exit.gguf", facts=facts)
    drafter = DraftModel(StageEngine(shard.path, CONFIG))
    try:
        layers = sum(facts.layer_bytes[:k])
        head = facts.by_name[TOKEN_EMBD].n_bytes + facts.by_name[OUTPUT_NORM].n_bytes
        assert layers + head < shard.size < layers + head + (3 << 20), "plus metadata, tokenizer"
        context = [1, 504, 3575, 282, 4649, 314]
        drafts = drafter.propose(context, 4).tokens
        assert len(drafts) == 4 and all(0 <= t < facts.n_vocab for t in drafts), drafts
    finally:
        drafter.close()
    whole, exit_ = (ReferenceModel(p, n_ctx=64, threads=1)
                    for p in (smollm2_path, tmp_path / "exit.gguf"))
    try:
        text = "The capital of France is"
        assert exit_.tokenize(text) == whole.tokenize(text)  # its own tokenizer
        assert exit_.greedy(context, 4)[0] == list(drafts)
    finally:
        whole.close()
        exit_.close()
