"""The OpenAI request bodies orch serve reads, and what it does with every field.

Each field of ``/v1/chat/completions`` and ``/v1/completions`` is one of:

* supported: it changes the answer as OpenAI documents;
* refused unless off: orch does not implement it, so a value other than OpenAI's default
  (``_OFF``) is a 400 naming the field, never a silent answer without it;
* ignored: it cannot change the answer (``user``, ``metadata``).

A field OpenAI does not have is a 400 too, as OpenAI answers it. docs/api.md lists them all.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchcore.sampling import MAX_TOP_K, MAX_TOP_LOGPROBS, SamplingParams


class RequestError(ValueError):
    """A request field orch refuses: ``param`` names it for the OpenAI error body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


# Fields orch does not implement -> the values that mean "off" (OpenAI's defaults; None is
# always off) and what to do instead.
_OFF: dict[str, tuple[tuple[Any, ...], str]] = {
    "best_of": ((1,), "one candidate per request; send several requests"),
    "frequency_penalty": ((0, 0.0), "not implemented; use repeat_penalty (1 = off)"),
    "presence_penalty": ((0, 0.0), "not implemented; use repeat_penalty (1 = off)"),
    "logit_bias": (({},), "not implemented"),
    "logprobs": ((False,), "log probabilities are not returned"),
    "top_logprobs": ((0,), "log probabilities are not returned"),
    "suffix": (("",), "insertion (a suffix after the completion) is not implemented"),
    "functions": (([],), "the deprecated functions field is not implemented; use tools"),
    "function_call": (("none", "auto"), "the deprecated function_call field is not "
                                        "implemented; use tool_choice"),
    "modalities": ((["text"],), "this server answers with text only"),
    "audio": ((), "this server answers with text only"),
    "prediction": ((), "predicted outputs are not implemented"),
    "reasoning_effort": ((), "not a reasoning model setting orch has"),
    "verbosity": ((), "not implemented"),
    "web_search_options": ((), "web search is not implemented"),
    "store": ((False,), "answers are not stored"),
    "service_tier": (("auto", "default"), "there is one tier"),
}
IGNORED = ("user", "metadata", "prompt_cache_key", "safety_identifier")

CHAT_REFUSED = ("frequency_penalty", "presence_penalty", "logit_bias", "functions",
                "function_call", "modalities", "audio", "prediction", "reasoning_effort",
                "verbosity", "web_search_options", "store", "service_tier")
COMPLETION_REFUSED = ("best_of", "frequency_penalty", "presence_penalty", "logit_bias",
                      "suffix")
MAX_N = 16  # answers to one request (each also needs a session of the server's)


def _is_off(value: Any, offs: tuple[Any, ...]) -> bool:
    # bool is an int: True must not pass for n=1, nor 0 for logprobs=False
    return value is None or any(value == off and isinstance(value, bool) == isinstance(off, bool)
                                for off in offs)


def check_refused(body: dict[str, Any], names: tuple[str, ...]) -> None:
    """A ``RequestError`` for the first field that is set to something orch cannot do."""
    for name in names:
        offs, why = _OFF[name]
        if name in body and not _is_off(body[name], offs):
            raise RequestError(name, f"{body[name]!r} is not supported ({why}); leave it out")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's; harmless here


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field OpenAI lacks is refused, as OpenAI does
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    # llama.cpp's own sampling fields, as its server takes them
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0)
    n: int | None = Field(None, ge=1, le=MAX_N)  # answers, a session each
    # refused unless off (``_OFF``, checked by ``parse`` first), or ignored (``IGNORED``)
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    logprobs: Any = None
    user: Any = None
    metadata: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise RequestError("stop", "at most 4 non-empty strings")
        return stops

    def answers(self) -> int:
        if (self.n or 1) > 1 and self.stream:
            raise RequestError("n", "several answers are not streamed; leave stream out, or "
                                    "send n streamed requests")
        return self.n or 1

    def sampling(self, default: SamplingParams) -> SamplingParams:
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                 "min_p": self.min_p, "repeat_penalty": self.repeat_penalty,
                 "seed": None if self.seed is None else self.seed % (1 << 32)}
        return replace(default, **{k: v for k, v in given.items() if v is not None})


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class CallMade(BaseModel):
    """A tool call of an earlier assistant message, sent back with the conversation."""

    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction

    def for_template(self, where: str) -> dict[str, Any]:
        """As chat templates read it: the arguments as an object, not text."""
        try:
            arguments = json.loads(self.function.arguments)
        except ValueError:
            raise RequestError(f"{where}.function.arguments", "is not JSON text") from None
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": arguments}}


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None  # ignored: a participant's name does not reach the template
    tool_calls: list[CallMade] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    refusal: Any = None
    audio: Any = None

    def text(self, where: str) -> dict[str, Any]:
        """The message for the template: ``{"role", "content"}``, text parts joined, the
        developer role as the system role templates know; a tool result's
        ``tool_call_id``, an assistant's ``tool_calls``."""
        if self.role == "function":
            raise RequestError(f"{where}.role", "'function' messages (deprecated) are not "
                                                "supported; send 'tool' messages")
        if self.role not in ("system", "user", "assistant", "developer", "tool"):
            raise RequestError(f"{where}.role", f"{self.role!r} is not a role; use system, "
                                                f"user, assistant, developer or tool")
        for name in ("function_call", "audio", "refusal"):
            if getattr(self, name):
                raise RequestError(f"{where}.{name}", "is not supported (function_call, audio "
                                                      "and refusals are not implemented)")
        if self.tool_calls and self.role != "assistant":
            raise RequestError(f"{where}.tool_calls", "only assistant messages make calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise RequestError(f"{where}.tool_call_id", "a tool message names the call it "
                                                        "answers with tool_call_id (and only it)")
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role,
                               "content": self._content(where, empty_ok=bool(self.tool_calls))}
        if self.tool_calls:
            out["tool_calls"] = [c.for_template(f"{where}.tool_calls[{i}]")
                                 for i, c in enumerate(self.tool_calls)]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def _content(self, where: str, empty_ok: bool = False) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            if empty_ok:
                return ""
            raise RequestError(f"{where}.content", "is missing; give the message's text")
        texts = []
        for i, part in enumerate(self.content):
            kind = part.get("type")
            if kind != "text":
                raise RequestError(f"{where}.content[{i}].type",
                                   f"{kind!r} parts are not supported: this model reads text "
                                   f"only (send {{'type': 'text', 'text': ...}} parts)")
            if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise RequestError(f"{where}.content[{i}]",
                                   "a text part is {'type': 'text', 'text': '...'}")
            texts.append(part["text"])
        return "\n".join(texts)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None  # forced calls follow the schema exactly either way


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the schema is enforced either way


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    functions: Any = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None  # a forced call is one call; auto may be several
    response_format: ResponseFormat | None = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    store: Any = None
    service_tier: Any = None

    def chat(self) -> list[dict[str, Any]]:
        return [m.text(f"messages[{i}]") for i, m in enumerate(self.messages)]

    def tool_mode(self) -> str | None:
        """None (no tools: "none", or none given), "auto", "required", or the name of the
        one function to call."""
        choice = self.tool_choice
        if isinstance(choice, NamedTool):
            if not any(t.function.name == choice.function.name for t in self.tools or ()):
                raise RequestError("tool_choice", f"names {choice.function.name!r}, which is "
                                                  f"not in tools")
            return choice.function.name
        if choice == "none" or not self.tools:
            if choice == "required":
                raise RequestError("tool_choice", "'required' needs tools")
            return None
        return choice or "auto"

    def check(self) -> None:
        """What the fields' types alone cannot say."""
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs", "needs logprobs: true")
        fmt = self.response_format
        if fmt is not None and (fmt.type == "json_schema") != (fmt.json_schema is not None):
            raise RequestError("response_format.json_schema",
                               "is given exactly when type is 'json_schema'")
        if fmt is not None and fmt.type != "text" and self.tool_mode() not in (None, "auto"):
            raise RequestError("response_format", "a forced tool call and a response format "
                                                  "cannot both shape one answer; send one")

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


Prompt = str | list[int]


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: the prompt's logprobs alone
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # the legacy shape's
    best_of: Any = None
    suffix: Any = None

    def check(self) -> None:
        """What the fields' types alone cannot say."""
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens", "0 only with echo (the prompt's logprobs "
                                             "alone); ask for at least 1 token")
        if self.logprobs is not None and self.stream:
            raise RequestError("logprobs", "completions' logprobs are not streamed; leave "
                                           "stream out (chat streams its logprobs)")

    def scores(self) -> bool:
        """Whether the prompt's rows are scored (echo with logprobs)."""
        return bool(self.echo) and self.logprobs is not None

    def one_prompt(self) -> Prompt:
        """The prompt as text or token ids; a batch of several is refused."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return prompt  # type: ignore[return-value]
        if len(prompt) != 1:
            raise RequestError("prompt", f"a batch of {len(prompt)} prompts is not supported; "
                                         f"send one request per prompt" if prompt else
                               "is empty: give some text")
        return prompt[0]

    def limit(self) -> int | None:
        return self.max_tokens


def parse_chat(body: Any) -> ChatRequest:
    """A chat request, or a ``RequestError`` / pydantic ``ValidationError`` saying why not."""
    check_refused(_object(body), CHAT_REFUSED)
    request = ChatRequest.model_validate(body)
    request.check()
    return request


def parse_completion(body: Any) -> CompletionRequest:
    check_refused(_object(body), COMPLETION_REFUSED)
    request = CompletionRequest.model_validate(body)
    request.check()
    return request


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("body", "must be a JSON object")
    return body
