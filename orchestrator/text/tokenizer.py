"""Text <-> token ids for the orchestrator, from the model's own GGUF vocabulary.

The orchestrator tokenizes prompts and detokenizes generated tokens itself; it never
evaluates layers. ``Tokenizer.from_gguf`` loads only the vocabulary (llama.cpp's
``vocab_only`` load: no tensors are read) and owns that C model until ``close()``.

Streaming output goes through two small state machines:

* ``StreamDecoder``: token ids in, printable text out. A UTF-8 character split across
  tokens (byte-level BPE and byte-fallback vocabularies do this to emoji) is held back
  until its last byte arrives.
* ``StopMatcher``: text in, text out until a stop string appears. Text that may be the
  start of a stop string is held back until it is known not to be one.

Chat prompts are rendered by ``chat`` (llama.cpp's built-in renderer, else the GGUF's
Jinja template) and tokenized here.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import llama_cpp
from gguf import Keys

from orchcore.errors import GGUFError, OrchError, UnsupportedModelError
from orchcore.ggufread import open_gguf
from orchcore.llama_ext import init_backend
from orchestrator.text.chat import builtin_chat, chat_turns, matching_cut, render_jinja
from orchestrator.text.encoding import utf8
from orchestrator.text.fragments import SpecialToken, partition, placeholders, token_ids

log = logging.getLogger(__name__)

_PIECE_BYTES = 64  # first buffer size for one token's text; longer pieces retry
_INT32_MAX = 2**31 - 1


class TokenIdError(OrchError, ValueError):
    """A token id outside the vocabulary (llama.cpp would abort the process on it)."""


class NoChatTemplateError(GGUFError):
    """The GGUF carries no chat template, so messages cannot be turned into a prompt."""


# --- loading ---------------------------------------------------------------------------

def _load_vocab_only(path: Path) -> llama_cpp.llama_model_p:
    if not path.is_file():
        raise _load_error(path)
    init_backend()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    params.use_extra_bufts = False  # no weights here; on AMX CPUs they crash (FINDINGS 1)
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise _load_error(path)
    return model


def _load_error(path: Path) -> GGUFError:
    """Why llama.cpp refused ``path``: the header's own problem if it has one."""
    try:
        open_gguf(path)
    except GGUFError as exc:
        return exc
    return UnsupportedModelError(
        path, "llama.cpp could not load its vocabulary (its log says why: often a tokenizer "
              "type this llama.cpp build does not know); use a GGUF made by a recent "
              "llama.cpp convert script")


def _token_or_none(token: int) -> int | None:
    return None if token == llama_cpp.LLAMA_TOKEN_NULL else int(token)


def _chat_template(model: llama_cpp.llama_model_p) -> str | None:
    raw = llama_cpp.llama_model_chat_template(model, None)
    return None if raw is None else raw.decode("utf-8", errors="replace")


# --- the tokenizer ---------------------------------------------------------------------


class Tokenizer:
    """A GGUF's vocabulary, loaded by llama.cpp without weights.

    Owns the C model: ``close()`` (or the end of a ``with`` block, or garbage collection)
    frees it, after which every method raises ``ValueError``.
    """

    def __init__(self, path: Path, model: llama_cpp.llama_model_p) -> None:
        """Take ownership of ``model``; use ``Tokenizer.from_gguf`` to make one."""
        self.path = path
        self._finalizer = weakref.finalize(self, llama_cpp.llama_model_free, model)
        vocab = llama_cpp.llama_model_get_vocab(model)
        self._vocab: llama_cpp.llama_vocab_p | None = vocab
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(vocab)
        self._eog: tuple[int, ...] | None = None
        self._specials: tuple[SpecialToken, ...] | None = None
        self.bos: int | None = _token_or_none(llama_cpp.llama_vocab_bos(vocab))
        self.eos: int | None = _token_or_none(llama_cpp.llama_vocab_eos(vocab))
        self.eot: int | None = _token_or_none(llama_cpp.llama_vocab_eot(vocab))
        self.add_bos: bool = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.add_eos: bool = bool(llama_cpp.llama_vocab_get_add_eos(vocab))
        self.chat_template: str | None = _chat_template(model)

    @classmethod
    def from_gguf(cls, path: Path | str) -> Tokenizer:
        """Load the vocabulary of the GGUF at ``path``. Raises a ``GGUFError`` naming it."""
        path = Path(path)
        return cls(path, _load_vocab_only(path))

    # --- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Free the C model. Safe to call twice."""
        self._vocab = None
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._vocab is None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _live_vocab(self) -> llama_cpp.llama_vocab_p:
        if self._vocab is None:
            raise ValueError(f"the tokenizer of {self.path} is closed; load it again")
        return self._vocab

    def check_ids(self, tokens: Iterable[int]) -> None:
        """Raise ``TokenIdError`` for the first id outside the vocabulary."""
        for token in tokens:
            if not 0 <= token < self.n_vocab:
                raise TokenIdError(f"token id {token} is outside the vocabulary "
                                   f"[0, {self.n_vocab}) of {self.path}")

    # --- text <-> tokens ---------------------------------------------------------------

    def encode(self, text: str, *, add_special: bool = True,
               parse_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        ``add_special``: add BOS/EOS where the vocabulary asks for them (``add_bos``).
        ``parse_special``: text such as ``<|im_start|>`` becomes its special token; turn
        it off for untrusted text that must not inject control tokens.
        """
        vocab = self._live_vocab()
        data = utf8(text)
        if len(data) >= _INT32_MAX:
            raise ValueError(f"text of {len(data)} bytes is too long for llama.cpp "
                             f"(limit {_INT32_MAX - 1}); split it")
        capacity = len(data) + 2  # at most one token per byte, plus BOS and EOS
        for _ in range(2):
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, capacity,
                                         add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            capacity = -n
        raise RuntimeError(f"llama_tokenize asked for a buffer of {capacity} tokens twice")

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token, as generated (no leading space removed).

        Bytes, not text: a token may hold part of a UTF-8 character. ``special``: render
        control tokens (``<|im_end|>``); without it they are empty.
        """
        vocab = self._live_vocab()
        self.check_ids((token,))
        buf = ctypes.create_string_buffer(_PIECE_BYTES)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
        if n < 0:  # buffer too small: -n is the size needed
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def decode(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """Text of ``tokens`` read from the start of a text: llama.cpp's inverse of
        ``encode``. A BOS that ``encode`` added is dropped; SentencePiece vocabularies
        also drop the space they put before the first word when there is no BOS.

        ``special``: render control tokens (BOS included) instead of dropping them.
        Bytes that are not valid UTF-8 become U+FFFD.
        """
        vocab = self._live_vocab()
        ids = [int(token) for token in tokens]
        self.check_ids(ids)
        if not ids:
            return ""
        arr = (llama_cpp.llama_token * len(ids))(*ids)
        capacity = 8 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(capacity)
            n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, capacity,
                                           not special, special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            capacity = -n
        raise RuntimeError(f"llama_detokenize asked for a buffer of {capacity} bytes twice")

    def is_end_of_generation(self, token: int) -> bool:
        """Whether generation ends at ``token`` (EOS, EOT and the vocabulary's other EOGs)."""
        return bool(llama_cpp.llama_vocab_is_eog(self._live_vocab(), token))

    @property
    def end_of_generation(self) -> tuple[int, ...]:
        """Every token at which generation ends."""
        if self._eog is None:
            vocab = self._live_vocab()
            self._eog = tuple(t for t in range(self.n_vocab)
                              if llama_cpp.llama_vocab_is_eog(vocab, t))
        return self._eog

    def special_text(self, token: int | None) -> str:
        """How a special token is written in a template (``<s>``); "" for None."""
        if token is None:
            return ""
        return self.piece(token, special=True).decode("utf-8", errors="replace")

    # --- chat --------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                            add_generation_prompt: bool = True,
                            template: str | None = None,
                            tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The prompt text for ``messages`` (``{"role": ..., "content": ...}`` dicts).

        ``add_generation_prompt``: end with the assistant's turn opening, so the model
        answers. ``template``: a Jinja template or llama.cpp template name to use instead
        of the GGUF's. llama.cpp renders the templates it recognises (it does not add a
        template's default system prompt); jinja2 renders the rest, and every template
        given ``tools`` (OpenAI's tool list, which llama.cpp's renderer cannot place).
        """
        source = template if template is not None else self.chat_template
        if source is None:
            raise NoChatTemplateError(
                self.path, f"has no chat template (metadata {Keys.Tokenizer.CHAT_TEMPLATE}); "
                           f"pass a raw prompt instead (--no-chat)")
        turns = chat_turns(messages)
        text = None if tools is not None else builtin_chat(source, turns,
                                                           add_generation_prompt)
        if text is not None:
            return text
        return render_jinja(source, [dict(m) for m in messages],
                            add_generation_prompt=add_generation_prompt,
                            bos_token=self.special_text(self.bos),
                            eos_token=self.special_text(self.eos),
                            **({} if tools is None else {"tools": list(tools)}))

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *,
                    add_generation_prompt: bool = True,
                    template: str | None = None,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids of the chat prompt, with exactly one BOS where the model wants one.

        Special tokens are parsed only where the template writes them: ``<|im_end|>``
        inside a message's content is text, so no message can forge another turn
        (``fragments``). Jinja templates often write the BOS text themselves and
        llama.cpp's renderer never does, so BOS is added only when the vocabulary asks for
        it and the prompt does not already start with it. ``template``, ``tools``: as for
        ``apply_chat_template``. An empty content (an assistant turn that only calls
        tools) stays empty: templates test it.
        """
        rendered = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            template=template, tools=tools)
        marks = placeholders(len(messages))
        masked = self.apply_chat_template([dict(m, content=mark if m["content"] else "")
                                           for m, mark in zip(messages, marks, strict=True)],
                                          add_generation_prompt=add_generation_prompt,
                                          template=template, tools=tools)
        marks, contents = [mark for m, mark in zip(messages, marks, strict=True)
                           if m["content"]], [m["content"] for m in messages if m["content"]]
        parts = matching_cut(masked, marks, contents, rendered)
        bos_text = self.special_text(self.bos)
        has_bos = bool(bos_text) and rendered.startswith(bos_text)
        ids = token_ids(partition(parts, self.specials), self._encode_text)
        if self.add_bos and not has_bos:  # what llama.cpp adds with add_special
            ids = [self.bos] * (self.bos is not None) + ids
            ids += [self.eos] * (self.add_eos and self.eos is not None)
        return ids

    def _encode_text(self, text: str) -> list[int]:
        return self.encode(text, add_special=False, parse_special=False)

    @property
    def specials(self) -> tuple[SpecialToken, ...]:
        """The tokens llama.cpp parses out of text with ``parse_special``: control,
        user-defined and unknown tokens, with their whitespace-stripping attributes."""
        if self._specials is None:
            vocab = self._live_vocab()
            wanted = (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
                      | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN)
            found = []
            for token in range(self.n_vocab):
                attr = llama_cpp.llama_vocab_get_attr(vocab, token)
                if attr & wanted:
                    text = llama_cpp.llama_vocab_get_text(vocab, token)
                    found.append(SpecialToken(
                        (text or b"").decode("utf-8", errors="replace"), token,
                        lstrip=bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP),
                        rstrip=bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP),
                        control=not attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED))
            self._specials = tuple(found)
        return self._specials


# --- streaming -------------------------------------------------------------------------


class StreamDecoder:
    """Generated token ids in, text that is safe to print out, one token at a time.

    Text is a continuation (no leading space is removed), so printing the prompt's
    ``decode`` and then every ``feed`` gives ``decode(prompt + generated)``. Bytes of an
    unfinished UTF-8 character are held back; invalid bytes become U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, *, special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        """The new printable text after ``token`` (may be "")."""
        return self._utf8.decode(self._tokenizer.piece(token, special=self._special))

    def flush(self) -> str:
        """At the end: held-back bytes of an unfinished character, as U+FFFD."""
        return self._utf8.decode(b"", final=True)


class StopMatcher:
    """Text chunks in, text out until a stop string ends; the stop is not emitted.

    ``feed`` returns ``(text_to_emit, stopped)``. The longest end of the text so far that
    could begin a stop string is held back until the next chunk decides it; ``flush()``
    returns it when generation ends without a stop.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(stops)
        for stop in self.stops:
            if not stop:
                raise ValueError("an empty stop string would stop before any text; remove it")
        self._longest = max((len(stop) for stop in self.stops), default=0)
        self._held = ""
        self.stop: str | None = None  # the stop string found, once stopped

    @property
    def stopped(self) -> bool:
        return self.stop is not None

    def feed(self, chunk: str) -> tuple[str, bool]:
        if self.stop is not None:
            return "", True
        text = self._held + chunk
        found = self._first_stop(text)
        if found is not None:
            at, self.stop = found
            self._held = ""
            return text[:at], True
        keep = self._partial_stop_length(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held-back text; "" once stopped."""
        held, self._held = self._held, ""
        return held

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """The stop that ends first in ``text`` (the longer one on a tie) and where it starts.

        Ending first, not starting first: that is the one a stream sees complete first, so
        the result does not depend on how the text was cut into chunks.
        """
        hits = [(at + len(stop), at, stop) for stop in self.stops if (at := text.find(stop)) >= 0]
        if not hits:
            return None
        _, at, stop = min(hits)
        return at, stop

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest end of ``text`` that is the start of a stop string."""
        for length in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[len(text) - length:]
            if any(stop.startswith(tail) for stop in self.stops):
                return length
        return 0
