"""A chat prompt as fragments: the template's own text, where special tokens such as
``<|im_end|>`` are parsed, and the messages' content, where they never are.

Tokenizing the rendered prompt as one text would let a user who writes ``<|im_end|>`` in a
message close their turn and forge a system or assistant turn. Instead the template is
rendered once with a placeholder for each content, the result is cut at the placeholders,
and the template's pieces are partitioned at special-token texts exactly as llama.cpp's
``tokenizer_st_partition`` does (longest token text first, each token's left/right
whitespace stripping); the content is never partitioned. Raw runs between special tokens
are then tokenized as llama.cpp would tokenize them, so a prompt whose content holds no
special text gets the same token ids as before.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SpecialToken:
    """A token llama.cpp parses out of text when asked to: CONTROL, USER_DEFINED, UNKNOWN."""

    text: str
    id: int
    lstrip: bool = False  # whitespace left of it is dropped
    rstrip: bool = False  # whitespace right of it is dropped
    control: bool = True  # parsed only when asked; user-defined tokens (Gemma's "\n\n")
    # are parsed in any text, content too


@dataclass(frozen=True)
class Raw:
    """Text to tokenize as text; ``trusted`` text may still hold special-token texts."""

    text: str
    trusted: bool


Fragment = Raw | int  # text, or a special token's id


def placeholders(count: int) -> list[str]:
    """One unguessable, whitespace-free marker per message content."""
    nonce = secrets.token_hex(8)
    return [f"orchcontent{i}x{nonce}" for i in range(count)]


def cut(rendered: str, marks: Sequence[str], contents: Sequence[str]) -> list[Raw]:
    """``rendered`` (a template rendered with ``marks`` as the contents) as template text
    (trusted) and the contents put back in their places (untrusted)."""
    if not marks:
        return [Raw(rendered, True)]
    index = {mark: i for i, mark in enumerate(marks)}
    pattern = "(" + "|".join(re.escape(m) for m in marks) + ")"
    parts: list[Raw] = []
    for n, piece in enumerate(re.split(pattern, rendered)):
        if n % 2:
            parts.append(Raw(contents[index[piece]], False))
        elif piece:
            parts.append(Raw(piece, True))
    return parts


def partition(parts: Sequence[Raw], specials: Sequence[SpecialToken]) -> list[Fragment]:
    """Trusted text split at special-token texts, longest text first (llama.cpp's order);
    untrusted text untouched. Consecutive raw text is joined: llama.cpp tokenizes each run
    between special tokens as one text."""
    fragments: list[Fragment] = list(parts)
    for special in sorted(specials, key=lambda s: len(s.text), reverse=True):
        if not special.text:
            continue
        split: list[Fragment] = []
        for fragment in fragments:
            if isinstance(fragment, Raw) and fragment.trusted and special.text in fragment.text:
                split.extend(_split_at(fragment.text, special))
            else:
                split.append(fragment)
        fragments = split
    return _join_runs(fragments)


def _split_at(text: str, special: SpecialToken) -> list[Fragment]:
    out: list[Fragment] = []
    pieces = text.split(special.text)
    for i, piece in enumerate(pieces):
        if i:
            out.append(special.id)
        if i < len(pieces) - 1 and special.lstrip:
            piece = piece.rstrip()
        if i and special.rstrip:
            piece = piece.lstrip()
        if piece:
            out.append(Raw(piece, True))
    return out


def _join_runs(fragments: Sequence[Fragment]) -> list[Fragment]:
    joined: list[Fragment] = []
    for fragment in fragments:
        if isinstance(fragment, Raw) and joined and isinstance(joined[-1], Raw):
            joined[-1] = Raw(joined[-1].text + fragment.text, False)
        else:
            joined.append(fragment)
    return joined


def token_ids(fragments: Sequence[Fragment], encode_text: Callable[[str], list[int]]
              ) -> list[int]:
    """The fragments' token ids; ``encode_text`` tokenizes a run of text with no special
    tokens parsed and nothing added."""
    ids: list[int] = []
    for fragment in fragments:
        if isinstance(fragment, Raw):
            ids.extend(encode_text(fragment.text))
        else:
            ids.append(fragment)
    return ids
