"""`orch serve` for careless and hostile clients, over two real workers: fields it cannot
honour are refused by name, the inputs clients really send are read, a client that leaves
frees its session at once, a full server says when to come back, bodies are bounded, and
errors tell the client what to do without the server's own details."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from orchestrator.cluster.client import WorkerClient
from orchestrator.serve.app import create_app
from orchestrator.settings import OrchSettings
from testkit.cluster import open_model, worker_server
from testkit.serving import running

KEY = "clients-key"
TOKEN = "clients-token"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy SmolLM2 goes on counting: a long answer


def call(base: str, method: str, path: str, body: Any = None, *,
         headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    """One request with the standard library's client; the response is left unread."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request(method, path, None if body is None else json.dumps(body),
                       {"Content-Type": "application/json", **(headers or {})})
    return connection.getresponse()


def until(check: Callable[[], Any], deadline_s: float, what: str) -> Any:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if value := check():
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} (within {deadline_s} s)")


@pytest.fixture(scope="module")
def served(smollm2_path, tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("clients")
    with worker_server(root / "w0", token=TOKEN) as a, \
            worker_server(root / "w1", token=TOKEN) as b, \
            open_model(smollm2_path, [a, b], TOKEN, root, max_sessions=2,
                       context_tokens=1024) as model:
        settings = OrchSettings.load(api_key=KEY, serve_queue=4, max_tokens=8,
                                     serve_max_body_bytes=1 << 20)
        with running(create_app(model, "smollm2", settings, aliases=["local"])) as base:
            workers = [WorkerClient(w, TOKEN, OrchSettings()) for w in (a, b)]
            try:
                yield {"base": base, "model": model, "workers": workers}
            finally:
                for w in workers:
                    w.close()


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served["base"] + "/v1", api_key=KEY, max_retries=0)


def sessions(served) -> list[int]:
    return [w.info().loaded.sessions for w in served["workers"]]


HI = [{"role": "user", "content": "Hi"}]


# --- 1. no silent fields -----------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("n", 0), ("top_logprobs", 2), ("frequency_penalty", 0.5),
    ("presence_penalty", -1.0), ("logit_bias", {"42": 5}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"), ("store", True), ("reasoning_effort", "high"),
])
def test_chat_refuses_what_it_cannot_do_by_name(client, field, value) -> None:
    with pytest.raises(openai.BadRequestError, match=field) as refused:
        client.chat.completions.create(model="smollm2", messages=HI, max_tokens=2,
                                       **{field: value})
    assert refused.value.body["param"] == field, refused.value.body


@pytest.mark.parametrize(("field", "value"), [
    ("n", 0), ("best_of", 3), ("suffix", " the end"), ("logprobs", 21),
    ("frequency_penalty", 1.0), ("logit_bias", {"42": -100}),
])
def test_completions_refuse_what_they_cannot_do_by_name(client, field, value) -> None:
    with pytest.raises(openai.BadRequestError, match=field):
        client.completions.create(model="smollm2", prompt="Hi", max_tokens=2,
                                  **{field: value})


def test_fields_at_their_defaults_are_accepted(client) -> None:
    answer = client.chat.completions.create(
        model="smollm2", messages=HI, max_tokens=2, n=1, logprobs=False,
        frequency_penalty=0, presence_penalty=0.0, logit_bias={}, user="someone",
        tool_choice="none", response_format={"type": "text"}, store=False,
        metadata={"a": "b"}, temperature=0)
    assert len(answer.choices) == 1 and answer.choices[0].message.content
    done = client.completions.create(model="smollm2", prompt="Hi", max_tokens=2, n=1,
                                     best_of=1, echo=False, suffix="", logprobs=None)
    assert done.choices[0].text


def test_an_unknown_field_is_refused(client) -> None:
    with pytest.raises(openai.BadRequestError, match="frobnicate: unrecognized"):
        client.chat.completions.create(model="smollm2", messages=HI, max_tokens=2,
                                       extra_body={"frobnicate": 1})


def test_a_model_not_served_is_404_naming_what_is(client) -> None:
    with pytest.raises(openai.NotFoundError, match="smollm2") as missing:
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2)
    assert "gpt-4o" in str(missing.value)
    assert [m.id for m in client.models.list().data] == ["smollm2", "local"]
    by_alias = client.chat.completions.create(model="local", messages=HI, max_tokens=2)
    assert by_alias.model == "local"


# --- 2. inputs clients send --------------------------------------------------------------


def test_content_parts_read_as_text(client) -> None:
    question = "What is the capital of France?"
    plain = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": question}], temperature=0)
    parts = client.chat.completions.create(
        model="smollm2", temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": question}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model="smollm2", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": "http://x/y.png"}}]}])


def test_prompt_as_strings_or_token_ids(client, served) -> None:
    text = "The capital of France is"
    ids = served["model"].tokenizer.encode(text)

    def complete(prompt: Any) -> str:
        return client.completions.create(model="smollm2", prompt=prompt, max_tokens=4,
                                         temperature=0).choices[0].text

    expected = complete(text)
    assert [complete([text]), complete(ids), complete([ids])] == [expected] * 3
    with pytest.raises(openai.BadRequestError, match="batch of 2 prompts"):
        complete([text, "The largest planet is"])
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        complete([1, 10**7])


# --- 3. sessions freed at once; a full server says when to come back ---------------------


def test_a_client_that_leaves_a_whole_answer_frees_its_session(served) -> None:
    body = json.dumps({"prompt": COUNTING, "max_tokens": 900, "temperature": 0}).encode()
    port = int(served["base"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                    b"Content-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        until(lambda: sessions(served) == [1, 1], 30, "the answer did not start")
    left = time.monotonic()  # the client went away, as `timeout 1 curl` does
    until(lambda: sessions(served) == [0, 0], 3, "the session outlived its client")
    assert time.monotonic() - left < 3


def test_a_full_server_queues_then_says_when_to_come_back(served) -> None:
    settings = OrchSettings.load(serve_queue=1, serve_queue_wait_s=0.5, max_tokens=900)
    long = {"prompt": COUNTING, "max_tokens": 900, "temperature": 0, "stream": True}
    with running(create_app(served["model"], "m", settings)) as base:
        streams = [call(base, "POST", "/v1/completions", long) for _ in range(2)]
        for stream in streams:  # both sessions of the plan answer
            assert stream.status == 200 and stream.readline().startswith(b"data:")
        started = time.monotonic()
        late = call(base, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        waited = time.monotonic() - started
        for stream in streams:
            stream.close()
    assert late.status == 429, late.read()
    assert int(late.headers["Retry-After"]) >= 1
    assert 0.4 < waited < 5, f"a queued request waited {waited:.1f} s for a 0.5 s limit"
    until(lambda: sessions(served) == [0, 0], 5, "the streams' sessions did not end")


# --- 4. bounded work per request ---------------------------------------------------------


def test_a_huge_body_is_refused_unread(served) -> None:
    port = int(served["base"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 31457280\r\n\r\n")
        reply = raw.recv(4096).decode()  # not one byte of the 30 MB was sent
    assert reply.startswith("HTTP/1.1 413"), reply


def test_tokenizing_a_long_prompt_does_not_hold_up_the_server(served) -> None:
    prompt = ("word " * 210_000)[:(1 << 20) - 200]  # under the body limit, over the context
    auth = {"Authorization": f"Bearer {KEY}"}
    slowest, done = 0.0, []

    def big() -> None:
        reply = call(served["base"], "POST", "/v1/completions", {"prompt": prompt},
                     headers=auth)
        done.append((reply.status, json.loads(reply.read())))

    thread = threading.Thread(target=big)
    thread.start()
    while thread.is_alive():
        started = time.monotonic()
        call(served["base"], "GET", "/v1/models", headers=auth).read()
        slowest = max(slowest, time.monotonic() - started)
    thread.join()
    assert done[0][0] == 400 and "context" in done[0][1]["error"]["message"], done
    assert slowest < 0.5, f"/v1/models took {slowest:.2f} s while a prompt was tokenized"


# --- 6. errors that help -----------------------------------------------------------------


def test_the_authorization_scheme_is_case_insensitive(served) -> None:
    for scheme in ("bearer", "BEARER", "Bearer"):
        reply = call(served["base"], "GET", "/v1/models",
                     headers={"Authorization": f"{scheme} {KEY}"})
        assert reply.status == 200, f"{scheme}: {reply.read()!r}"
    wrong = call(served["base"], "GET", "/v1/models", headers={"Authorization": "Basic x"})
    assert wrong.status == 401
    assert json.loads(wrong.read())["error"]["type"] == "authentication_error"


# --- 7. /metrics -------------------------------------------------------------------------


def scrape(served) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    reply = call(served["base"], "GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status == 200
    text = reply.read().decode()
    return {sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items())):
            sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples}


def test_metrics_behind_the_key_count_answers_and_stages(client, served) -> None:
    assert call(served["base"], "GET", "/metrics").status == 401
    before = scrape(served)
    client.completions.create(model="smollm2", prompt="The capital of France is",
                              max_tokens=5, temperature=0)
    after = until(lambda: (m := scrape(served)).get("orch_completion_tokens_total", 0)
                  >= before.get("orch_completion_tokens_total", 0) + 5 and m, 10,
                  "the answer's tokens were not counted")
    assert after["orch_requests_total,path=/v1/completions,status=200"] >= 1
    assert after["orch_prompt_tokens_total"] >= before.get("orch_prompt_tokens_total", 0) + 5
    assert after["orch_time_to_first_token_seconds_count"] >= 1
    assert after["orch_time_per_output_token_seconds_count"] >= 1
    assert after["orch_workers_up"] == 2
    assert (after["orch_active_sessions"], after["orch_queue_depth"]) == (0, 0)
    stages = [k for k in after if k.startswith("orch_stage_compute_seconds_total")]
    assert len(stages) == 2, stages
