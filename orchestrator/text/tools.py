"""Tool calls: which format a model's chat template asks for, the calls in its output, and
the grammar that forces one.

The template itself renders the tools and the earlier calls and results
(``Tokenizer.encode_chat(..., tools=...)``); what the model then writes depends on its
family, recognised from the template's text:

* ``hermes`` (Qwen 2.5 and 3, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>``, one block per call, possibly after some text;
* ``llama3`` (Llama 3.1-3.3): the whole answer is ``{"name": ..., "parameters": {...}}``,
  perhaps after ``<|python_tag|>``, several separated by ``;``;
* ``mistral`` (Mistral Nemo, Small): ``[TOOL_CALLS][{"name": ..., "arguments": {...}}]``,
  or the newer ``[TOOL_CALLS]name[ARGS]{...}``.

A template that shows none of these has no tool support. Formats are data
(``ToolFormat``); the parsers read them.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.text.structured import schema_grammar

_ID_CHARS = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: ``arguments`` is JSON text, as OpenAI returns it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolFormat:
    name: str
    detect: tuple[str, ...]  # texts of the template that show this family (all of them)
    opens: tuple[str, ...]  # texts that start a call in the output
    anywhere: bool  # a call may follow some text (else it is the whole answer)
    arguments_key: str  # where the arguments go in the call's JSON
    grammar_root: str  # GBNF of one forced call around the rule ``orch-call``
    id_length: int = 0  # the template's required length of call ids; 0: any


HERMES = ToolFormat("hermes", ("<tool_call>",), ("<tool_call>",), True, "arguments",
                    'root ::= "<tool_call>\\n" orch-call "\\n</tool_call>"')
MISTRAL = ToolFormat("mistral", ("[TOOL_CALLS]",), ("[TOOL_CALLS]",), True, "arguments",
                     'root ::= "[TOOL_CALLS][" orch-call "]"', id_length=9)
LLAMA3 = ToolFormat("llama3", ("<|start_header_id|>", '"parameters"'),
                    ("<|python_tag|>", "{"), False, "parameters", "root ::= orch-call")
FORMATS = (HERMES, MISTRAL, LLAMA3)


def tool_format(template: str | None) -> ToolFormat | None:
    """The tool-call format of a chat template; None when it has no tool support."""
    if not template:
        return None
    return next((f for f in FORMATS if all(d in template for d in f.detect)), None)


def new_call_id(fmt: ToolFormat) -> str:
    """An id for a call: ``call_`` and 24 characters, or what the template requires."""
    if fmt.id_length:
        return "".join(secrets.choice(_ID_CHARS) for _ in range(fmt.id_length))
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


# --- parsing -------------------------------------------------------------------------------


def parse_calls(text: str, fmt: ToolFormat) -> tuple[str, list[ToolCall]]:
    """The answer's content and its calls. Text that does not hold well-formed calls is all
    content (a model may write about a tool without calling it)."""
    parse = {"hermes": _parse_hermes, "mistral": _parse_mistral, "llama3": _parse_llama3}
    calls = parse[fmt.name](text)
    if calls is None:
        return text, []
    at = min((i for o in fmt.opens if (i := text.find(o)) >= 0), default=0)
    content = text[:at].strip() if fmt.anywhere else ""
    return content, [ToolCall(new_call_id(fmt), name, args) for name, args in calls]


def _call(obj: Any, key: str) -> tuple[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(key, obj.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _all(found: list[tuple[str, str] | None]) -> list[tuple[str, str]] | None:
    return None if not found or any(c is None for c in found) else found  # type: ignore[return-value]


def _parse_hermes(text: str) -> list[tuple[str, str]] | None:
    blocks = text.split("<tool_call>")[1:]
    found = []
    for block in blocks:
        body = block.split("</tool_call>")[0].strip()
        try:
            found.append(_call(json.loads(body), "arguments"))
        except ValueError:
            return None
    return _all(found)


def _parse_mistral(text: str) -> list[tuple[str, str]] | None:
    if "[TOOL_CALLS]" not in text:
        return None
    body = text.split("[TOOL_CALLS]", 1)[1].strip()
    if "[ARGS]" in body:  # newer: name[ARGS]{...}, repeated with [TOOL_CALLS]
        found = []
        for part in body.split("[TOOL_CALLS]"):
            name, _, args = part.partition("[ARGS]")
            try:
                found.append(_call({"name": name.strip(), "arguments": json.loads(args)},
                                   "arguments"))
            except ValueError:
                return None
        return _all(found)
    try:
        calls = json.loads(body)
    except ValueError:
        return None
    return _all([_call(c, "arguments") for c in (calls if isinstance(calls, list) else [calls])])


def _parse_llama3(text: str) -> list[tuple[str, str]] | None:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return None
    decoder, found, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            obj, end = decoder.raw_decode(body, at)
        except ValueError:
            return None
        found.append(_call(obj, "parameters"))
        at = end
        while at < len(body) and body[at] in " \t\n;":
            at += 1
    return _all(found)


# --- streaming -----------------------------------------------------------------------------


class CallWatch:
    """Streamed text in, content safe to send out: text that may begin a call is held back
    until it is known not to, and everything from a call's start on is kept for
    ``finish``."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self._text = ""  # all the text so far
        self._sent = 0  # characters sent as content
        self._calling = False

    def feed(self, text: str) -> str:
        self._text += text
        if self._calling:
            return ""
        rest = self._text[self._sent:]
        if not self.fmt.anywhere:
            head = self._text.lstrip()
            if any(head.startswith(o) or o.startswith(head) for o in self.fmt.opens):
                self._calling = any(head.startswith(o) for o in self.fmt.opens)
                return ""
            out, self._sent = rest, len(self._text)
            return out
        at = min((i for o in self.fmt.opens if (i := rest.find(o)) >= 0), default=-1)
        if at >= 0:
            self._calling = True
            out = rest[:at]
        else:
            out = rest[:len(rest) - _partial_open(rest, self.fmt.opens)]
        self._sent += len(out)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content not sent yet and the calls; without calls, the held text is
        content."""
        rest = self._text[self._sent:]
        content, calls = parse_calls(rest, self.fmt)
        return (content if calls else rest), calls


def _partial_open(text: str, opens: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins one of ``opens``."""
    longest = max(len(o) for o in opens)
    for n in range(min(len(text), longest - 1), 0, -1):
        if any(o.startswith(text[-n:]) for o in opens):
            return n
    return 0


# --- forcing a call ------------------------------------------------------------------------


def forced_grammar(tools: Sequence[Mapping[str, Any]], fmt: ToolFormat,
                   only: str | None = None) -> str:
    """GBNF for exactly one call in ``fmt``: of the function ``only``, or of any of
    ``tools`` (OpenAI's ``{"type": "function", "function": {...}}``). A parameters schema
    orch cannot enforce raises ``SchemaError``."""
    calls = []
    for tool in tools:
        function = tool["function"]
        if only is not None and function["name"] != only:
            continue
        calls.append({"type": "object", "additionalProperties": False,
                      "required": ["name", fmt.arguments_key],
                      "properties": {"name": {"const": function["name"]},
                                     fmt.arguments_key: function.get("parameters")
                                     or {"type": "object"}}})
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    rules = re.sub(r"^root ::=", "orch-call ::=", schema_grammar(schema), flags=re.M)
    return f"{fmt.grammar_root}\n{rules}"
