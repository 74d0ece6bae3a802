"""The OpenAI API that real clients need, end to end: the official client against
`orch serve` over two real workers and the real SmolLM2-135M. Structured output always
parses and validates; a forced tool call round-trips through Qwen 2.5's template (ChatML,
like SmolLM2's); chat logprobs equal the unsplit model's log-softmax."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import numpy as np
import openai
import pytest

from orchestrator.serve.app import create_app
from orchestrator.settings import OrchSettings
from testkit.cluster import open_model, worker_server
from testkit.reference import ReferenceModel
from tests.test_serve_clients import running

TOKEN = "api-token-for-tests"
TEMPLATES = Path(__file__).parent / "data" / "templates"
QWEN25 = (TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()

CITY = {"type": "object", "additionalProperties": False,
        "required": ["name", "country", "population", "capital"],
        "properties": {"name": {"type": "string", "maxLength": 24},
                       "country": {"type": "string", "maxLength": 24},
                       "population": {"type": "integer"},
                       "capital": {"type": "boolean"},
                       "tags": {"type": "array", "items": {"enum": ["old", "big", "sea"]},
                                "maxItems": 3}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 24},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "Describe Paris as JSON."}]


@pytest.fixture(scope="module")
def served(smollm2_path, tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("api")
    with worker_server(root / "w0", token=TOKEN) as a, \
            worker_server(root / "w1", token=TOKEN) as b, \
            open_model(smollm2_path, [a, b], TOKEN, root, max_sessions=2, codec="f32",
                       context_tokens=1024) as model:
        settings = OrchSettings.load(max_tokens=64)
        with running(create_app(model, "smollm2", settings)) as base:
            yield {"base": base, "model": model}


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served["base"] + "/v1", api_key="none", max_retries=0)


@pytest.fixture
def qwen_template(served) -> Iterator[None]:
    """The served model reads Qwen 2.5's template, which has tools (both are ChatML)."""
    tokenizer = served["model"].tokenizer
    own, tokenizer.chat_template = tokenizer.chat_template, QWEN25
    try:
        yield
    finally:
        tokenizer.chat_template = own


# --- structured output ---------------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, None), (0.9, 1), (1.2, 7)])
def test_json_schema_answers_parse_and_validate(client, temperature, seed) -> None:
    answer = client.chat.completions.create(
        model="smollm2", messages=ASK, temperature=temperature, seed=seed, max_tokens=200,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "city", "schema": CITY, "strict": True}})
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), CITY)


def test_json_object_answers_are_objects(client) -> None:
    answer = client.chat.completions.create(
        model="smollm2", messages=ASK, temperature=0.7, seed=3, max_tokens=200,
        response_format={"type": "json_object"})
    text = answer.choices[0].message.content
    assert isinstance(json.loads(text), dict), text


def test_streamed_json_schema_answer_validates(client) -> None:
    stream = client.chat.completions.create(
        model="smollm2", messages=ASK, temperature=0, max_tokens=200, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "city",
                                                                "schema": CITY}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), CITY)


@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "integer", "minimum": 3}, "minimum"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True,
                                             "items": {"type": "string"}}}}, "uniqueItems"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf"),
    ({"type": "object", "required": ["b"], "properties": {}}, "required"),
])
def test_a_schema_feature_orch_cannot_enforce_is_named(client, schema, named) -> None:
    with pytest.raises(openai.BadRequestError, match=named) as refused:
        client.chat.completions.create(
            model="smollm2", messages=ASK, max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                    "schema": schema}})
    assert refused.value.body["param"].startswith("response_format.json_schema.schema"), \
        refused.value.body


# --- tools ---------------------------------------------------------------------------------


def test_a_template_without_tools_is_a_clear_400(client) -> None:
    with pytest.raises(openai.BadRequestError, match="no tool support") as refused:
        client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=4,
                                       tools=[WEATHER])
    assert refused.value.body["param"] == "tools"


@pytest.mark.usefixtures("qwen_template")
def test_a_required_tool_call_round_trips(client) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    answer = client.chat.completions.create(model="smollm2", messages=ask, tools=[WEATHER, CLOCK],
                                            tool_choice="required", temperature=0,
                                            max_tokens=120)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_"), call
    tool = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    # the call and its result go back through the template; the model answers in text
    again = client.chat.completions.create(
        model="smollm2", tools=[WEATHER, CLOCK], temperature=0, max_tokens=16,
        messages=[*ask, {"role": "assistant", "content": None,
                         "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}])
    assert again.choices[0].message.content, again


@pytest.mark.usefixtures("qwen_template")
def test_a_named_tool_call_streams_as_deltas(client) -> None:
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER, CLOCK], temperature=0, max_tokens=120, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
            call = calls.setdefault(delta_call.index, {"name": "", "arguments": ""})
            call["name"] += delta_call.function.name or ""
            call["arguments"] += delta_call.function.arguments or ""
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls" and list(calls) == [0], calls
    assert calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


# --- logprobs ------------------------------------------------------------------------------


def _log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    peak = row.max()
    return row - (peak + np.log(np.exp(row - peak).sum()))


def test_chat_logprobs_equal_the_unsplit_model(client, served, smollm2_path) -> None:
    ask = [{"role": "user", "content": "Name three colours."}]
    answer = client.chat.completions.create(model="smollm2", messages=ask, temperature=0,
                                            max_tokens=12, logprobs=True, top_logprobs=5)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens - (
        answer.choices[0].finish_reason == "stop"), entries  # no entry for the end token
    prompt = served["model"].encode(ask)
    reference = ReferenceModel(smollm2_path, n_ctx=256)
    try:
        tokens, logits = reference.greedy(prompt, len(entries))
    finally:
        reference.close()
    tokenizer = served["model"].tokenizer
    for step, (entry, token) in enumerate(zip(entries, tokens, strict=True)):
        want = _log_softmax(logits[step][-1])
        assert bytes(entry.bytes) == tokenizer.piece(token), (step, entry)
        assert abs(entry.logprob - want[token]) < 1e-5, (step, entry.logprob, want[token])
        assert len(entry.top_logprobs) == 5
        best = np.argsort(-want, kind="stable")[:5]
        for alt, t in zip(entry.top_logprobs, best, strict=True):
            assert bytes(alt.bytes) == tokenizer.piece(int(t)), (step, alt)
            assert abs(alt.logprob - want[t]) < 1e-5, (step, alt.logprob, want[t])
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy took the best


def test_streamed_logprobs_equal_the_whole_answers(client) -> None:
    ask = [{"role": "user", "content": "Count to five."}]
    whole = client.chat.completions.create(model="smollm2", messages=ask, temperature=0,
                                           max_tokens=10, logprobs=True, top_logprobs=2)
    stream = client.chat.completions.create(model="smollm2", messages=ask, temperature=0,
                                            max_tokens=10, logprobs=True, top_logprobs=2,
                                            stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == \
        [e.model_dump() for e in whole.choices[0].logprobs.content]


def test_logprobs_without_asking_are_absent_and_top_needs_logprobs(client) -> None:
    answer = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=2)
    assert answer.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=2,
                                       top_logprobs=3)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=2,
                                       logprobs=True, top_logprobs=21)


# --- langchain-openai, as agents and editors call it ----------------------------------------


@pytest.mark.usefixtures("qwen_template")
def test_langchain_structured_output_and_a_bound_tool_round_trip(served) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class City(BaseModel):
        """A city and its country."""

        name: str = Field(max_length=24)
        country: str = Field(max_length=24)

    llm = ChatOpenAI(base_url=served["base"] + "/v1", api_key="none", model="smollm2",
                     temperature=0, max_tokens=120, max_retries=0)
    city = llm.with_structured_output(City).invoke("Describe Paris.")  # json_schema
    assert isinstance(city, City), city
    bound = llm.bind_tools([WEATHER], tool_choice="required")
    ask = HumanMessage("What is the weather in Paris?")
    called = bound.invoke([ask])
    (call,) = called.tool_calls
    assert call["name"] == "get_weather", call
    jsonschema.validate(call["args"], WEATHER["function"]["parameters"])
    answer = llm.bind_tools([WEATHER]).invoke(
        [ask, called, ToolMessage("18 degrees, sunny", tool_call_id=call["id"])])
    assert answer.content, answer
