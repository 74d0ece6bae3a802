"""Chat messages to prompt text: llama.cpp's built-in renderer for the templates it
recognises, the GGUF's Jinja template (sandboxed jinja2) for the others, and the cut of a
rendered prompt back into the template's text and the messages' content (``fragments``).
``Tokenizer.apply_chat_template`` and ``Tokenizer.encode_chat`` use them."""

from __future__ import annotations

import ctypes
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import llama_cpp

from orchcore.errors import OrchError
from orchestrator.text.encoding import utf8
from orchestrator.text.fragments import Raw, cut

log = logging.getLogger(__name__)


class ChatTemplateError(OrchError, ValueError):
    """The chat template cannot render these messages (bad messages or a broken template)."""


def matching_cut(masked: str, marks: Sequence[str], contents: Sequence[str],
                 rendered: str) -> list[Raw]:
    """The template's text and the contents, as the template placed them. A template may
    trim the content (llama.cpp's Gemma and Llama 3 renderers do): the trimmed contents
    are put back when that is what the template rendered."""
    for variant in (lambda c: c, str.strip):
        parts = cut(masked, marks, [variant(c) for c in contents])
        if "".join(p.text for p in parts) == rendered:
            return parts
    log.debug("the chat template transforms message content; it is tokenized as given")
    return cut(masked, marks, contents)


def chat_turns(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(role, content) of each message, or a typed error naming the first bad one."""
    if not messages:
        raise ChatTemplateError("no messages: give at least one "
                                "{'role': 'user', 'content': ...}")
    turns = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ChatTemplateError(f"message {i} needs string 'role' and 'content' "
                                    f"entries, got {dict(message)!r}")
        if "\0" in role or "\0" in content:
            raise ChatTemplateError(f"message {i} contains a NUL character; remove it")
        turns.append((role, content))
    return turns


def builtin_chat(template: str, turns: Sequence[tuple[str, str]],
                 add_assistant: bool) -> str | None:
    """llama.cpp's rendering with a template it recognises; None when it does not."""
    encoded = [(utf8(role), utf8(content)) for role, content in turns]
    chat = (llama_cpp.llama_chat_message * len(encoded))(
        *(llama_cpp.llama_chat_message(role, content) for role, content in encoded))
    tmpl = template.encode()
    capacity = 2 * sum(len(r) + len(c) for r, c in encoded) + 256
    for _ in range(2):
        buf = ctypes.create_string_buffer(capacity)
        n = llama_cpp.llama_chat_apply_template(tmpl, chat, len(encoded), add_assistant,
                                                buf, capacity)
        if n < 0:
            return None
        if n <= capacity:
            return buf.raw[:n].decode("utf-8", errors="replace")
        capacity = n
    return None


# --- Jinja templates -------------------------------------------------------------------


class _TemplateRaised(Exception):
    """A template called ``raise_exception(message)``."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    # Hugging Face's tojson: no HTML escaping, non-ASCII kept.
    return json.dumps(value, indent=indent, ensure_ascii=False)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError("this model's chat template needs the jinja2 package: "
                                "pip install jinja2, or pass a raw prompt (--no-chat)") from None
    # The environment Hugging Face's apply_chat_template uses, which templates are written for.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not parse: {exc}") from None


def render_jinja(template: str, messages: Sequence[Mapping[str, Any]], *,
                 add_generation_prompt: bool, bos_token: str = "",
                 eos_token: str = "", **extra: Any) -> str:
    """Render a Hugging Face style Jinja chat template in a sandbox; ``extra``: more of its
    variables (``tools``)."""
    from jinja2 import TemplateError

    compiled = _compile(template)
    try:
        return compiled.render(messages=list(messages),
                               add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except _TemplateRaised as exc:
        raise ChatTemplateError(f"the chat template rejected the messages: {exc}") from None
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template failed: {exc}") from None
