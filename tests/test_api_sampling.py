"""The last stage's side of structured output and logprobs: the last shard's vocabulary,
the grammar sampler, the log-softmax, and their trip over the wire."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from orchcore.chunks import StageResult
from orchcore.errors import InvalidInputError, InvalidSettingError
from orchcore.sampling import SamplingParams, TokenLogprobs
from orchcore.shard import LayerRange, write_shard
from orchcore.wire import convert
from orchestrator.text.structured import SchemaError, any_object_grammar, schema_grammar
from orchestrator.text.tokenizer import Tokenizer
from worker.sampler import TokenSampler, token_logprobs

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["n", "ok", "word"],
          "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"},
                         "word": {"type": "string", "maxLength": 6},
                         "list": {"type": "array", "items": {"enum": ["a", "b"]},
                                  "maxItems": 2}}}


@pytest.fixture(scope="module")
def last_shard(smollm2_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "last.gguf"
    shard = write_shard(smollm2_path, LayerRange(24, 30), path)
    yield shard.path
    shard.path.unlink()


@pytest.fixture(scope="module")
def vocab(last_shard):
    with Tokenizer.from_gguf(last_shard) as tokenizer:
        yield tokenizer


def test_the_last_shard_carries_the_whole_vocabulary(smollm2_path, vocab) -> None:
    """The tokenizer's arrays are longer than the header reader reads (49152 tokens): they
    are copied from the file, byte for byte, not dropped."""
    with Tokenizer.from_gguf(smollm2_path) as source:
        assert vocab.n_vocab == source.n_vocab == 49152
        text = "Hello wörld 🙂 <|im_start|>{\"a\": 1}"
        assert vocab.encode(text) == source.encode(text)
        assert all(vocab.piece(t) == source.piece(t) for t in range(0, 49152, 97))


def _generate(sampler: TokenSampler, vocab: Tokenizer, seed: int, steps: int = 80) -> str:
    """Tokens sampled from random logits (the worst case: the grammar refuses nearly every
    first pick) until the end of generation."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        token = sampler.sample(rng.normal(0, 3, vocab.n_vocab).astype(np.float32))
        if vocab.is_end_of_generation(token):
            return vocab.decode(out)
        out.append(token)
    raise AssertionError(f"no end within {steps} tokens: {vocab.decode(out)!r}")


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, 0), (0.8, 1), (1.5, 2)])
def test_grammar_sampling_gives_valid_json(vocab, temperature, seed) -> None:
    params = SamplingParams(temperature=temperature, seed=seed, top_k=0, top_p=1.0, min_p=0.0,
                            grammar=schema_grammar(SCHEMA))
    with TokenSampler(params, vocab.n_vocab, vocab._live_vocab()) as sampler:
        text = _generate(sampler, vocab, seed)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_greedy_with_a_grammar_takes_the_best_token_allowed(vocab) -> None:
    row = np.zeros(vocab.n_vocab, dtype=np.float32)
    brace, quote = vocab.encode("{", add_special=False), vocab.encode('"', add_special=False)
    row[quote[0]] = 10.0  # the best token is not allowed first
    row[brace[0]] = 5.0
    params = SamplingParams(grammar=any_object_grammar())
    with TokenSampler(params, vocab.n_vocab, vocab._live_vocab()) as sampler:
        assert sampler.sample(row) == brace[0]
        assert sampler.sample(row) == quote[0]  # then a key may start


def test_a_grammar_needs_a_vocabulary_and_must_parse(vocab) -> None:
    with pytest.raises(InvalidInputError, match="no vocabulary"):
        TokenSampler(SamplingParams(grammar='root ::= "a"'), vocab.n_vocab, None)
    with pytest.raises(InvalidInputError, match="does not parse"):
        TokenSampler(SamplingParams(grammar="root ::= (("), vocab.n_vocab, vocab._live_vocab())


def test_logprobs_are_the_log_softmax_and_its_top() -> None:
    rng = np.random.default_rng(5)
    row = rng.normal(0, 4, 1000).astype(np.float32)
    row[[7, 9]] = row.max() + 1  # a tie: the lower id first
    got = token_logprobs(row, 3, 4)
    x = row.astype(np.float64)
    want = x - np.log(np.exp(x - x.max()).sum()) - x.max()
    assert got.logprob == pytest.approx(want[3], abs=1e-12)
    order = sorted(range(1000), key=lambda i: (-want[i], i))[:4]
    assert [t for t, _ in got.top] == order, got.top
    assert [p for _, p in got.top] == pytest.approx([want[i] for i in order], abs=1e-12)
    assert np.exp([p for _, p in got.top]).sum() < 1
    assert token_logprobs(row, 3, 0).top == ()


def test_sampler_returns_logprobs_only_when_asked(vocab) -> None:
    row = np.linspace(0, 1, vocab.n_vocab, dtype=np.float32)
    with TokenSampler(SamplingParams(), vocab.n_vocab) as plain:
        assert plain.logprobs(row, plain.sample(row)) is None
    with TokenSampler(SamplingParams(logprobs=True, top_logprobs=2), vocab.n_vocab) as asked:
        token = asked.sample(row)
        scores = asked.logprobs(row, token)
    assert token == vocab.n_vocab - 1 and scores.top[0][0] == token, scores


def test_grammar_and_logprobs_travel_with_the_session() -> None:
    params = SamplingParams(temperature=0.5, seed=9, grammar=any_object_grammar(),
                            logprobs=True, top_logprobs=20)
    assert convert.sampling_from_proto(convert.sampling_to_proto(params)) == params
    result = StageResult("s", 4, 17, logprobs=TokenLogprobs(-0.123456789012,
                                                            ((17, -0.1234), (3, -2.5))))
    assert convert.result_from_proto(convert.result_to_proto(result)) == result
    plain = StageResult("s", 5, 18)
    assert convert.result_from_proto(convert.result_to_proto(plain)).logprobs is None


@pytest.mark.parametrize(("value", "field"), [({"top_logprobs": 21}, "top_logprobs"),
                                              ({"logprobs": 1}, "logprobs"),
                                              ({"grammar": 5}, "grammar")])
def test_sampling_params_refuse_bad_values(value, field) -> None:
    with pytest.raises(InvalidSettingError, match=field):
        SamplingParams(**value)


@pytest.mark.parametrize(("schema", "where"), [
    ({"type": "number", "exclusiveMaximum": 3}, "/exclusiveMaximum"),
    ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "/properties/a/not"),
    ({"type": ["string", "null"], "maxLength": 3}, "/type"),
    ({"allOf": [{"type": "object"}]}, "/allOf"),
    ({"$ref": "https://example.invalid/s.json"}, "/$ref"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "/pattern"),
    ({"type": "array", "contains": {"type": "integer"}}, "/contains"),
])
def test_schemas_orch_cannot_enforce_are_refused_where_they_are(schema, where) -> None:
    with pytest.raises(SchemaError) as refused:
        schema_grammar(schema)
    assert refused.value.where == where, refused.value


def test_annotations_and_references_pass() -> None:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "T",
              "$defs": {"Pet": {"type": "object", "description": "a pet",
                                "properties": {"name": {"type": "string"}},
                                "required": ["name"]}},
              "type": "object", "properties": {"pet": {"$ref": "#/$defs/Pet"}}}
    assert "root ::=" in schema_grammar(schema)
