"""What a chat request asks of an answer beyond plain text, and the answer shaped to it.

* ``response_format`` ``json_object`` / ``json_schema``: a grammar the last stage's sampler
  enforces (``orchestrator.text.structured``), so the answer always parses and validates.
* ``tools``: the model's own chat template renders them, and the calls it writes are
  parsed out of its answer (``orchestrator.text.tools``); ``tool_choice`` ``"required"``
  or a named function is a grammar too, of exactly one call.
* ``logprobs`` / ``top_logprobs``: computed on the last stage for each sampled token, and
  returned in OpenAI's ``logprobs.content`` shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from orchcore.sampling import SamplingParams
from orchestrator.pipeline.session import TextPiece
from orchestrator.serve.openai import ChatRequest, RequestError
from orchestrator.text.structured import SchemaError, any_object_grammar, schema_grammar
from orchestrator.text.tokenizer import Tokenizer
from orchestrator.text.tools import CallWatch, ToolCall, ToolFormat, forced_grammar, tool_format


@dataclass(frozen=True)
class Shape:
    """How one chat answer is asked for and read back."""

    tools: list[dict[str, Any]] | None = None  # for the template; None: no tools
    fmt: ToolFormat | None = None  # read tool calls out of the answer
    grammar: str = ""
    logprobs: bool = False
    top_logprobs: int = 0

    def sampling(self, base: SamplingParams) -> SamplingParams:
        return replace(base, grammar=self.grammar, logprobs=self.logprobs,
                       top_logprobs=self.top_logprobs)

    def watch(self) -> CallWatch | None:
        return CallWatch(self.fmt) if self.fmt is not None else None


PLAIN = Shape()


def shape_chat(body: ChatRequest, template: str | None) -> Shape:
    """The shape of ``body``'s answer with this model's chat ``template``, or a
    ``RequestError`` naming the field orch cannot honour."""
    mode = body.tool_mode()
    tools = fmt = None
    grammar = ""
    if mode is not None:
        fmt = tool_format(template)
        if fmt is None:
            raise RequestError("tools", "this model's chat template has no tool support (it "
                                        "writes none of the call formats orch reads: Qwen's "
                                        "<tool_call>, Llama 3's JSON, Mistral's [TOOL_CALLS]); "
                                        "leave tools out or serve a model made for tools")
        tools = [t.model_dump(exclude_none=True) for t in body.tools or ()]
        if mode != "auto":
            grammar = _forced(tools, fmt, None if mode == "required" else mode)
    response = body.response_format
    if response is not None and response.type == "json_object":
        grammar = any_object_grammar()
    elif response is not None and response.type == "json_schema":
        try:
            grammar = schema_grammar(response.json_schema.json_schema)
        except SchemaError as exc:
            raise RequestError(f"response_format.json_schema.schema{exc.where.replace('/', '.')}",
                               f"{exc}") from None
    return Shape(tools, fmt, grammar, bool(body.logprobs), body.top_logprobs or 0)


def _forced(tools: Sequence[Mapping[str, Any]], fmt: ToolFormat, only: str | None) -> str:
    for i, tool in enumerate(tools):
        if only is None or tool["function"]["name"] == only:
            try:
                schema_grammar(tool["function"].get("parameters") or {"type": "object"})
            except SchemaError as exc:
                raise RequestError(f"tools[{i}].function.parameters"
                                   f"{exc.where.replace('/', '.')}", f"{exc}") from None
    return forced_grammar(tools, fmt, only)


# --- the answer ----------------------------------------------------------------------------


def logprob_content(tokenizer: Tokenizer, piece: TextPiece) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` entries for the tokens of ``piece``."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        raw = tokenizer.piece(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
                "bytes": list(raw)}

    out = []
    for token, score in zip(piece.tokens, piece.scores, strict=True):
        if score is None:
            continue
        item = entry(token, score.logprob)
        item["top_logprobs"] = [entry(t, p) for t, p in score.top]
        out.append(item)
    return out


def tool_calls(calls: Sequence[ToolCall], *, streamed: bool = False) -> list[dict[str, Any]]:
    """The calls as OpenAI returns them (with their ``index`` in a stream)."""
    return [{**({"index": i} if streamed else {}), "id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(calls)]


@dataclass
class Collected:
    """A whole (not streamed) answer's text and logprobs."""

    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    def add(self, tokenizer: Tokenizer, piece: TextPiece) -> None:
        self.text.append(piece.text)
        self.logprobs += logprob_content(tokenizer, piece)


def chat_message(text: str, shape: Shape) -> tuple[dict[str, Any], bool]:
    """The assistant message for the answer ``text``, and whether it calls tools."""
    calls: list[ToolCall] = []
    if shape.fmt is not None:
        text, calls = _parse(text, shape.fmt)
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else ""),
                               "refusal": None}
    if calls:
        message["tool_calls"] = tool_calls(calls)
    return message, bool(calls)


def _parse(text: str, fmt: ToolFormat) -> tuple[str, list[ToolCall]]:
    watch = CallWatch(fmt)
    head = watch.feed(text)
    tail, calls = watch.finish()
    return head + tail, calls


def logprobs_of(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if entries is None else {"content": entries, "refusal": None}

