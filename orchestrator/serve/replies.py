"""The bodies orch serve answers with, in OpenAI's shapes: whole answers, stream chunks,
usage, and validation errors turned into one readable line."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import ValidationError

from orchestrator.pipeline.session import Finished
from orchestrator.serve.gate import ApiError

FINISH = {"length": "length", "stop": "stop", "end": "stop"}  # ours -> OpenAI's


def invalid(exc: ValidationError) -> ApiError:
    """A 400 naming each bad field; a field OpenAI does not have is named as such."""
    lines, param = [], None
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"])
        param = param or where
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unrecognized field (the fields orch serve reads are "
                         f"listed in its docs/api.md)")
        else:
            lines.append(f"{where}: {e['msg']}")
    return ApiError(400, "; ".join(lines), param=param)


def ident(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(done: Finished) -> dict:
    completion = len(done.session.generated)
    return {"prompt_tokens": done.stats.prompt_tokens, "completion_tokens": completion,
            "total_tokens": done.stats.prompt_tokens + completion}


def choice(kind: str, index: int, text: str, done: Finished, *,
           message: dict | None = None, finish: str | None = None,
           logprobs: dict | None = None) -> dict:
    """One answer of a whole reply; ``message`` (chat) replaces the plain one holding
    ``text``, and ``finish`` the finish reason of ``done`` (``tool_calls``)."""
    out: dict[str, Any] = {"index": index, "finish_reason": finish or FINISH[done.reason],
                           "logprobs": logprobs}
    if kind == "chat.completion":
        out["message"] = message or {"role": "assistant", "content": text, "refusal": None}
    else:
        out["text"] = text
    return out


def whole(kind: str, name: str, choices: list[dict], dones: list[Finished]) -> dict:
    """A whole reply of one or more answers to one prompt (counted once in the usage)."""
    prompt = dones[0].stats.prompt_tokens
    completion = sum(len(d.session.generated) for d in dones)
    return {"id": ident(kind), "object": kind, "created": int(time.time()), "model": name,
            "choices": choices, "usage": {"prompt_tokens": prompt,
                                          "completion_tokens": completion,
                                          "total_tokens": prompt + completion}}


def chunk(kind: str, ident: str, created: int, name: str, content: str | dict | None,
          finish: str | None = None, usage: dict | None = None,
          logprobs: dict | None = None) -> dict:
    if usage is not None:
        choices: list[dict] = []
    elif kind == "chat.completion":
        delta = content if isinstance(content, dict) else \
            ({} if content is None else {"content": content})
        choices = [{"index": 0, "delta": delta, "logprobs": logprobs,
                    "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": content or "", "logprobs": None,
                    "finish_reason": finish}]
    body = {"id": ident, "object": f"{kind}.chunk" if kind == "chat.completion" else kind,
            "created": created, "model": name, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
