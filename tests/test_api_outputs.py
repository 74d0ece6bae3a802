"""Prompt logprobs (echo), n answers and embeddings through the official OpenAI client,
against `orch serve` over two real workers and the real SmolLM2-135M: the split model's
values equal the unsplit model's."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import numpy as np
import openai
import pytest

from orchestrator.cluster.client import WorkerClient
from orchestrator.serve.app import create_app
from orchestrator.settings import OrchSettings
from testkit.cluster import open_model, worker_server
from testkit.reference import ReferenceModel, whole_llama
from testkit.waiting import wait_until
from tests.test_serve_clients import running

TEXT = "The capital of France is Paris, and the capital of Italy is"


@pytest.fixture(scope="module")
def served(smollm2_path, tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("outputs-api")
    with worker_server(root / "w0") as a, worker_server(root / "w1") as b, \
            open_model(smollm2_path, [a, b], None, root, max_sessions=3, codec="f32",
                       context_tokens=256, logprob_rows=6) as model:
        settings = OrchSettings.load(max_tokens=16, serve_queue=4)
        workers = [WorkerClient(w, None, OrchSettings()) for w in (a, b)]
        try:
            with running(create_app(model, "smollm2", settings)) as base:
                yield {"base": base, "model": model, "workers": workers}
        finally:
            for w in workers:
                w.close()


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served["base"] + "/v1", api_key="none", max_retries=0)


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    peak = rows.max(-1, keepdims=True)
    return rows - (peak + np.log(np.exp(rows - peak).sum(-1, keepdims=True)))


def _sessions_end(served: dict) -> None:
    wait_until(lambda: [w.info().loaded.sessions for w in served["workers"]] == [0, 0], 10,
               "every session to end on every stage")


def test_echo_logprobs_equal_the_unsplit_model(client, served, smollm2_path) -> None:
    """lm-evaluation-harness's request: echo, logprobs 1, max_tokens 1, token ids."""
    tokens = served["model"].encode(TEXT, chat=False)
    answer = client.completions.create(model="smollm2", prompt=[tokens], echo=True,
                                       logprobs=1, max_tokens=1, temperature=0)
    got = answer.choices[0].logprobs
    assert len(got.tokens) == len(tokens) + 1, got.tokens  # the prompt, then one token
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    reference = ReferenceModel(smollm2_path, n_ctx=256)
    try:
        want = _log_softmax(reference.eval(tokens))
    finally:
        reference.close()
    full = [*tokens, int(np.argmax(want[-1]))]
    for i in range(1, len(full)):
        assert abs(got.token_logprobs[i] - want[i - 1][full[i]]) < 1e-5, (i, got.token_logprobs[i])
        [(text, best)] = got.top_logprobs[i].items()
        assert abs(best - want[i - 1].max()) < 1e-5, (i, text, best)
    assert answer.choices[0].text.startswith(TEXT), answer.choices[0].text  # ids: their text
    assert got.text_offset == sorted(got.text_offset), got.text_offset
    _sessions_end(served)


def test_max_tokens_0_with_echo_scores_the_prompt_alone(client) -> None:
    answer = client.completions.create(model="smollm2", prompt=TEXT, echo=True, logprobs=0,
                                       max_tokens=0)
    choice = answer.choices[0]
    assert choice.text == TEXT, choice.text
    assert answer.usage.completion_tokens == 0
    assert len(choice.logprobs.tokens) == answer.usage.prompt_tokens
    assert all(isinstance(p, float) for p in choice.logprobs.token_logprobs[1:]), choice.logprobs
    assert choice.logprobs.top_logprobs[1] == {}, "logprobs 0: no alternatives"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="smollm2", prompt=TEXT, max_tokens=0)


def test_n_greedy_answers_equal_one_answer(client, served) -> None:
    one = client.completions.create(model="smollm2", prompt=TEXT, max_tokens=6, temperature=0)
    three = client.completions.create(model="smollm2", prompt=TEXT, max_tokens=6,
                                      temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.text for c in three.choices] == [one.choices[0].text] * 3, three.choices
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    _sessions_end(served)


def test_seeded_n_answers_take_seeds_of_their_own(client, served) -> None:
    """The n answers run as n sessions at once, which stage 0 batches: a batch moves logits
    (README: exact against the unsplit model fed the same batches), so they are not held to
    separate requests token for token (that check failed about 1 run in 5). What holds: each
    answer has a seed of its own, and a seeded request alone is reproducible."""
    ask = [{"role": "user", "content": "Tell me a word."}]
    together = client.chat.completions.create(model="smollm2", messages=ask, max_tokens=8,
                                              temperature=1.0, seed=11, n=3)
    texts = [c.message.content for c in together.choices]
    assert len(set(texts)) > 1, f"three seeds gave one answer: {texts}"

    def alone(seed: int) -> str:
        return client.chat.completions.create(model="smollm2", messages=ask, max_tokens=8,
                                              temperature=1.0, seed=seed
                                              ).choices[0].message.content
    assert [alone(11 + i) for i in range(3)] == [alone(11 + i) for i in range(3)]
    _sessions_end(served)


def test_n_beyond_the_sessions_is_refused(client) -> None:
    with pytest.raises(openai.BadRequestError, match="sessions"):
        client.completions.create(model="smollm2", prompt=TEXT, max_tokens=2, n=4)


def test_embeddings_equal_llama_cpp_embeddings(client, smollm2_path) -> None:
    inputs = [TEXT, "Hello"]
    got = client.embeddings.create(model="smollm2", input=inputs)
    llama = whole_llama(smollm2_path, embedding=True, n_ctx=256)
    try:
        for item, text in zip(got.data, inputs, strict=True):
            want = np.asarray(llama.embed(text, normalize=False), np.float64).mean(axis=0)
            want /= np.linalg.norm(want)
            assert np.abs(np.asarray(item.embedding) - want).max() < 1e-5, text
    finally:
        llama.close()
    packed = client.embeddings.create(model="smollm2", input=TEXT, encoding_format="base64")
    unpacked = np.frombuffer(base64.b64decode(packed.data[0].embedding), "<f4")
    assert np.allclose(unpacked, got.data[0].embedding, atol=1e-6), "base64: float32 bytes"
    assert got.usage.prompt_tokens > 10


def test_embeddings_take_token_ids_and_refuse_other_dimensions(client, served) -> None:
    tokens = served["model"].encode(TEXT, chat=False)
    by_ids = client.embeddings.create(model="smollm2", input=tokens)
    by_text = client.embeddings.create(model="smollm2", input=TEXT)
    assert by_ids.data[0].embedding == by_text.data[0].embedding
    assert len(by_text.data[0].embedding) == 576
    with pytest.raises(openai.BadRequestError, match="576"):
        client.embeddings.create(model="smollm2", input=TEXT, dimensions=64)
