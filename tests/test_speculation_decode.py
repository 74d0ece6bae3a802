"""The speculative decoding loop end to end in process: a chain of engines gives the same
tokens as the unsplit model for the same drafts (greedy and seeded sampling); a draft model
that is the target itself drafts everything right; stop tokens end the answer."""

from __future__ import annotations

import pytest

from orchcore.engine import EngineConfig, StageEngine
from orchcore.errors import InvalidSettingError
from orchcore.modelgen import preset, write_model
from orchcore.sampling import SamplingParams
from orchcore.speculation.decode import EngineTarget, decode
from orchcore.speculation.drafters import PromptLookup
from orchcore.speculation.vocab import open_draft_model, read_vocab_facts
from testkit.chain import Chain, ChainTarget
from testkit.reference import ReferenceModel

CONFIG = EngineConfig(threads=1, context_tokens=256, max_sessions=2, batch_tokens=64)
NEW = 48
COPY = ("<|im_start|>user\nRepeat this text exactly: The old lighthouse keeper climbed "
        "the stairs every evening to light the lamp, and the ships passed safely through "
        "the narrow strait.<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def copy_prompt(smollm2_path) -> list[int]:
    ref = ReferenceModel(smollm2_path, threads=1)
    try:
        return ref.tokenize(COPY)
    finally:
        ref.close()


def run(target, prompt, k, params=None):
    return decode(target, prompt, NEW, drafter=PromptLookup(), k=k, params=params)


@pytest.mark.parametrize("params", [None, SamplingParams(temperature=0.8, seed=11)],
                         ids=["greedy", "sampled"])
def test_chain_decodes_like_the_unsplit_model(smollm2_path, copy_prompt, tmp_path, params,
                                              capsys):
    with StageEngine(smollm2_path, CONFIG) as whole:
        want, stats = run(EngineTarget(whole), copy_prompt, 4, params)
        plain, _ = run(EngineTarget(whole, "plain"), copy_prompt, 0, params)
    chain = Chain(smollm2_path, [10, 20], tmp_path, CONFIG)
    try:
        got, chain_stats = run(ChainTarget(chain), copy_prompt, 4, params)
    finally:
        chain.close()
    assert got == want, "a chain fed the same drafts decides the same tokens"
    assert chain_stats == stats
    assert stats.accepted > NEW // 3, f"a copy task keeps most drafts: {stats}"
    assert stats.passes < len(want), stats
    same = sum(a == b for a, b in zip(want, plain, strict=False))
    with capsys.disabled():
        print(f"\n{'greedy' if params is None else 'sampled'}: speculative {stats.tokens} "
              f"tokens in {stats.passes} passes ({stats.accepted}/{stats.drafted} drafts "
              f"kept); equal to plain decoding at {same}/{len(want)} tokens")


def test_the_target_as_its_own_draft_model_keeps_every_draft(tmp_path):
    model = write_model(tmp_path / "m.gguf", preset("tiny-llama-gqa", n_layers=2))
    drafter = open_draft_model(model, read_vocab_facts(model), CONFIG)
    try:
        with StageEngine(model, CONFIG) as engine:
            out, stats = decode(EngineTarget(engine), [1, 17, 300, 42], 30, drafter=drafter,
                                k=4)
            plain, _ = decode(EngineTarget(engine, "plain"), [1, 17, 300, 42], 30)
    finally:
        drafter.close()
    assert out == plain
    assert stats.accepted == stats.drafted > 0, stats
    assert stats.passes == 6, f"5 tokens per pass: {stats}"


def test_stop_token_ends_the_answer(tmp_path):
    model = write_model(tmp_path / "m.gguf", preset("tiny-llama-gqa", n_layers=2))
    with StageEngine(model, CONFIG) as engine:
        plain, _ = decode(EngineTarget(engine, "a"), [1, 17, 300, 42], 20)
        stop = plain[5]
        first = plain.index(stop)
        out, stats = decode(EngineTarget(engine, "b"), [1, 17, 300, 42], 20,
                            drafter=PromptLookup(), k=4, stop={stop})
    assert out == plain[:first + 1] and stats.tokens == first + 1, (out, plain)


def test_penalised_sessions_are_refused(tmp_path):
    model = write_model(tmp_path / "m.gguf", preset("tiny-llama-gqa", n_layers=1))
    with StageEngine(model, CONFIG) as engine, pytest.raises(InvalidSettingError,
                                                             match="repeat_penalty to 1"):
        decode(EngineTarget(engine), [1, 2], 4, params=SamplingParams(repeat_penalty=1.2))
