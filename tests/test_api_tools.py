"""Tool calls for the families of models.yaml, on their published chat templates (as text:
the models themselves are hub-only here) and canned model outputs: the format each template
asks for, the tools and earlier calls rendered, the calls parsed (whole and streamed), and
the grammar of a forced call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.serve.openai import ChatRequest, RequestError, parse_chat
from orchestrator.serve.shaping import chat_message, shape_chat
from orchestrator.text.tokenizer import render_jinja
from orchestrator.text.tools import (
    HERMES,
    LLAMA3,
    MISTRAL,
    CallWatch,
    forced_grammar,
    parse_calls,
    tool_format,
)

TEMPLATES = Path(__file__).parent / "data" / "templates"
QWEN25 = (TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()
QWEN3 = (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text()
LLAMA32 = (TEMPLATES / "meta-llama-Llama-3.2-3B-Instruct.jinja").read_text()
NEMO = (TEMPLATES / "mistralai-Mistral-Nemo-Instruct-2407.jinja").read_text()
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string"}}}}}
ARGS = {"city": "Paris"}


@pytest.mark.parametrize(("template", "fmt"), [(QWEN25, HERMES), (QWEN3, HERMES),
                                               (LLAMA32, LLAMA3), (NEMO, MISTRAL),
                                               (CHATML, None), (None, None)])
def test_each_family_is_recognised_by_its_template(template, fmt) -> None:
    assert tool_format(template) is fmt


def _conversation(call_id: str) -> list[dict]:
    """A user turn, the assistant's call, the tool's result: as the request gives them."""
    body = parse_chat({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "18 degrees"}],
        "tools": [WEATHER]})
    return body.chat()


@pytest.mark.parametrize(("template", "call_id", "shows"), [
    (QWEN25, "call_1", ['"name": "get_weather"', '<tool_call>\n{"name": "get_weather", '
                        '"arguments": {"city": "Paris"}}\n</tool_call>',
                        "<tool_response>\n18 degrees\n</tool_response>"]),
    (QWEN3, "call_1", ['"name": "get_weather"', '"arguments": {"city": "Paris"}',
                       "<tool_response>\n18 degrees\n</tool_response>"]),
    (LLAMA32, "call_1", ['"name": "get_weather"', '"parameters": {"city": "Paris"}',
                         "18 degrees"]),
    (NEMO, "abcDEF123", ["[AVAILABLE_TOOLS]", '[TOOL_CALLS][{"name": "get_weather", '
                         '"arguments": {"city": "Paris"}, "id": "abcDEF123"}]',
                         '"call_id": "abcDEF123"']),
])
def test_templates_render_tools_calls_and_results(template, call_id, shows) -> None:
    text = render_jinja(template, _conversation(call_id), add_generation_prompt=True,
                        tools=[WEATHER], bos_token="<s>", eos_token="</s>")
    for wanted in shows:
        assert wanted in text, f"{wanted!r} not in:\n{text}"


@pytest.mark.parametrize(("fmt", "output", "content"), [
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
             '</tool_call>', ""),
    (HERMES, 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": '
             '{"city": "Paris"}}\n</tool_call>', "Let me look."),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}', ""),
    (LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', ""),
    (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, '
              '"id": "abcDEF123"}]', ""),
    (MISTRAL, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', ""),
])
def test_calls_are_parsed_from_each_format(fmt, output, content) -> None:
    got, calls = parse_calls(output, fmt)
    assert got == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", ARGS)], calls
    assert len({c.id for c in calls}) == len(calls)
    if fmt is MISTRAL:
        assert all(len(c.id) == 9 and c.id.isalnum() for c in calls), calls


def test_several_calls_are_all_parsed() -> None:
    two = ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
           '<tool_call>\n{"name": "b", "arguments": {"x": 1}}\n</tool_call>')
    assert [c.name for c in parse_calls(two, HERMES)[1]] == ["a", "b"]
    llama = '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}'
    assert [c.name for c in parse_calls(llama, LLAMA3)[1]] == ["a", "b"]


@pytest.mark.parametrize(("fmt", "output"), [
    (HERMES, "The <tool_call> tag is how I call tools."),
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"ci'),  # cut short
    (LLAMA3, "Paris is sunny."),
    (LLAMA3, '{"not": "a call"}'),
    (MISTRAL, "No tools needed."),
])
def test_text_that_is_not_a_call_stays_content(fmt, output) -> None:
    assert parse_calls(output, fmt) == (output, [])


@pytest.mark.parametrize("cut", [1, 3, 7])
def test_a_streamed_call_is_held_back_and_content_flows(cut) -> None:
    output = ('Checking <tool_caller> first.\n<tool_call>\n{"name": "get_weather", '
              '"arguments": {"city": "Paris"}}\n</tool_call>')
    watch = CallWatch(HERMES)
    sent = "".join(watch.feed(output[i:i + cut]) for i in range(0, len(output), cut))
    tail, calls = watch.finish()
    assert sent + tail == "Checking <tool_caller> first.\n", (sent, tail)
    assert "<tool_call>\n" not in sent
    assert [c.name for c in calls] == ["get_weather"]


def test_plain_streamed_text_is_not_held_for_ever() -> None:
    watch = CallWatch(LLAMA3)
    assert watch.feed("Par") == "Par" and watch.feed("is.") == "is."
    assert watch.finish() == ("", [])
    watch = CallWatch(LLAMA3)
    assert watch.feed(' {"name": "get_weather", ') == ""
    assert watch.feed('"parameters": {"city": "Paris"}}') == ""
    assert [c.name for c in watch.finish()[1]] == ["get_weather"]


@pytest.mark.parametrize(("fmt", "starts"), [(HERMES, 'root ::= "<tool_call>\\n" orch-call'),
                                             (LLAMA3, "root ::= orch-call"),
                                             (MISTRAL, 'root ::= "[TOOL_CALLS][" orch-call')])
def test_a_forced_call_is_a_grammar_of_one_call(fmt, starts) -> None:
    grammar = forced_grammar([WEATHER, {"type": "function", "function": {"name": "now"}}], fmt)
    assert grammar.startswith(starts), grammar
    assert grammar.count("root ::=") == 1 and "orch-call ::=" in grammar, grammar
    assert '"\\"get_weather\\""' in grammar and '"\\"now\\""' in grammar, grammar
    only = forced_grammar([WEATHER, {"type": "function", "function": {"name": "now"}}], fmt,
                          only="now")
    assert '"\\"get_weather\\""' not in only


def _request(**fields) -> ChatRequest:
    return parse_chat({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_tool_choice_modes() -> None:
    assert shape_chat(_request(tools=[WEATHER]), QWEN25).grammar == ""  # auto: free text
    forced = shape_chat(_request(tools=[WEATHER], tool_choice="required"), QWEN25)
    assert forced.grammar.startswith('root ::= "<tool_call>') and forced.fmt is HERMES
    none = shape_chat(_request(tools=[WEATHER], tool_choice="none"), CHATML)
    assert none.tools is None and none.fmt is None  # no tools: any template
    with pytest.raises(RequestError, match="no tool support"):
        shape_chat(_request(tools=[WEATHER]), CHATML)
    with pytest.raises(RequestError, match="not in tools"):
        _request(tools=[WEATHER], tool_choice={"type": "function",
                                               "function": {"name": "other"}}).tool_mode()
    with pytest.raises(RequestError) as both:
        _request(tools=[WEATHER], tool_choice="required",
                 response_format={"type": "json_object"})
    assert both.value.param == "response_format"


def test_a_tool_schema_orch_cannot_enforce_is_named_when_forced() -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}
    with pytest.raises(RequestError) as refused:
        shape_chat(_request(tools=[WEATHER, bad], tool_choice="required"), QWEN25)
    assert refused.value.param == "tools[1].function.parameters.properties.n.minimum"
    assert shape_chat(_request(tools=[bad]), QWEN25).grammar == ""  # auto needs no grammar


def test_the_answer_message_carries_calls_or_text() -> None:
    shape = shape_chat(_request(tools=[WEATHER]), QWEN25)
    message, called = chat_message('<tool_call>\n{"name": "get_weather", "arguments": '
                                   '{"city": "Paris"}}\n</tool_call>', shape)
    assert called and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "get_weather",
                                                    "arguments": json.dumps(ARGS)}
    message, called = chat_message("It is sunny.", shape)
    assert not called and message == {"role": "assistant", "content": "It is sunny.",
                                      "refusal": None}


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "tool", "content": "x"}, "messages[0].tool_call_id"),
    ({"role": "user", "content": "x", "tool_call_id": "c"}, "messages[0].tool_call_id"),
    ({"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
     "messages[0].tool_calls"),
    ({"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{no"}}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"role": "function", "content": "x", "name": "f"}, "messages[0].role"),
])
def test_tool_messages_that_make_no_sense_are_refused_by_name(message, param) -> None:
    with pytest.raises(RequestError) as refused:
        parse_chat({"messages": [message]}).chat()
    assert refused.value.param == param
