"""``/v1/completions``' own logprobs shape (OpenAI's legacy completions): per token its
text, its logprob, the most likely tokens there as ``{text: logprob}``, and where its text
starts. With ``echo`` the prompt comes first (its first token has no logprob: nothing
comes before it), as lm-evaluation-harness reads it to score a continuation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from orchcore.chunks import RowScore
from orchcore.sampling import TokenLogprobs
from orchestrator.pipeline.session import Finished
from orchestrator.text.tokenizer import Tokenizer


def echoed(tokenizer: Tokenizer, prompt: Any, tokens: Sequence[int]) -> str:
    """The prompt's text as the answer repeats it: as sent, or its token ids' text."""
    return prompt if isinstance(prompt, str) else tokenizer.decode(tokens, special=True)


def logprobs(tokenizer: Tokenizer, done: Finished, prompt: Sequence[int],
             rows: Sequence[RowScore], *, echo: bool, start: int) -> dict[str, Any]:
    """The legacy ``logprobs`` of one choice: the prompt's tokens (with ``echo``; ``rows``
    its scored rows, row i scoring token i + 1), then every token generated (the one that
    ends the answer too); ``start``: where the first one's text starts in the answer's
    text (0 with ``echo``, else after the prompt)."""
    session = done.session
    scored: list[tuple[int, TokenLogprobs | RowScore | None]] = []
    if echo:
        scored += [(prompt[0], None)]
        scored += [(t, rows[i] if i < len(rows) else None) for i, t in enumerate(prompt[1:])]
    scored += list(zip(session.generated, session.scores, strict=True))
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}
    text = b""
    for token, score in scored:
        raw = tokenizer.piece(token, special=True)
        out["tokens"].append(raw.decode("utf-8", errors="replace"))
        out["token_logprobs"].append(None if score is None else score.logprob)
        out["top_logprobs"].append(None if score is None else _top(tokenizer, score.top))
        out["text_offset"].append(start + len(text.decode("utf-8", errors="ignore")))
        text += raw
    return out


def _top(tokenizer: Tokenizer, top: Sequence[tuple[int, float]]) -> dict[str, float]:
    """``{text: logprob}``, most likely first; two tokens of one text keep the likelier."""
    out: dict[str, float] = {}
    for token, logprob in top:
        out.setdefault(tokenizer.piece(token, special=True).decode("utf-8", "replace"),
                       logprob)
    return out
