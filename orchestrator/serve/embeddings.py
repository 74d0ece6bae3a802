"""``/v1/embeddings``: the request body, and the pooled final hidden states in OpenAI's
shape. Each input is one short-lived session through the stages
(``RunningModel.embed``); the vector is L2-normalized, as OpenAI's and llama-server's
are."""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.serve.openai import RequestError

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: Any = None  # identifies the caller; ignored

    def inputs(self) -> list[str | list[int]]:
        """Each input: a text, or token ids."""
        given = self.input
        if isinstance(given, str) or (given and isinstance(given[0], int)):
            items: list[Any] = [given]
        else:
            items = list(given)
        if not items or len(items) > MAX_INPUTS:
            raise RequestError("input", f"give 1 to {MAX_INPUTS} inputs")
        for i, item in enumerate(items):
            if not item:
                raise RequestError(f"input[{i}]" if len(items) > 1 else "input",
                                   "is empty: give some text")
        return items

    def check_dimensions(self, width: int) -> None:
        """Only the model's own width: a shortened vector would not be this model's."""
        if self.dimensions is not None and self.dimensions != width:
            raise RequestError("dimensions", f"this model's embeddings have {width} "
                                             f"dimensions; leave dimensions out (or give "
                                             f"{width})")


def parse_embeddings(body: Any) -> EmbeddingRequest:
    if not isinstance(body, dict):
        raise RequestError("body", "must be a JSON object")
    return EmbeddingRequest.model_validate(body)


def normalized(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def reply(name: str, vectors: list[np.ndarray], encoding: str, tokens: int) -> dict[str, Any]:
    """OpenAI's answer: one item per input, in order; base64 is the float32 bytes."""
    def item(i: int, v: np.ndarray) -> dict[str, Any]:
        data: Any = (base64.b64encode(v.astype("<f4").tobytes()).decode()
                     if encoding == "base64" else v.tolist())
        return {"object": "embedding", "index": i, "embedding": data}

    return {"object": "list", "model": name, "data": [item(i, v) for i, v in
                                                       enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
