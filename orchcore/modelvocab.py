"""The vocabulary of a generated model: a SentencePiece ("llama") tokenizer with byte
fallback and generated pieces, as GGUF keys (``orchcore.modelgen`` writes it into every
model it makes)."""

from __future__ import annotations

import itertools
import string
from collections.abc import Iterator

import gguf

# SentencePiece tokenizer: special pieces, then byte fallback, then normal pieces.
_SPECIAL_TOKENS = (
    ("<unk>", gguf.TokenType.UNKNOWN),
    ("<s>", gguf.TokenType.CONTROL),
    ("</s>", gguf.TokenType.CONTROL),
)
_WORD_START = "\u2581"  # SentencePiece's word-boundary marker; must be in the vocabulary
_BYTE_PIECE = "<0x{:02X}>"  # the byte-fallback piece llama.cpp looks up for each byte
MIN_VOCAB = len(_SPECIAL_TOKENS) + 256 + 1


def add_tokenizer(writer: gguf.GGUFWriter, n_vocab: int, extra_special: tuple[str, ...] = ()
                   ) -> None:
    """A SentencePiece ("llama") vocabulary with byte fallback and generated pieces."""
    tokens = [text for text, _ in _SPECIAL_TOKENS] + list(extra_special)
    types = [kind for _, kind in _SPECIAL_TOKENS] + [gguf.TokenType.CONTROL] * len(extra_special)
    tokens += [_BYTE_PIECE.format(b) for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    n_normal = n_vocab - len(tokens)
    tokens += itertools.islice(_normal_pieces(), n_normal)
    types += [gguf.TokenType.NORMAL] * n_normal
    # SPM merges the highest-scoring pair first: earlier pieces count as more frequent
    scores = [0.0] * (n_vocab - n_normal) + [-float(rank) for rank in range(n_normal)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for text, add_id in zip(("<unk>", "<s>", "</s>"), (
            writer.add_unk_token_id, writer.add_bos_token_id, writer.add_eos_token_id),
            strict=True):
        add_id(tokens.index(text))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _normal_pieces() -> Iterator[str]:
    """The word marker, printable ASCII, then marked and bare lowercase words by length."""
    yield _WORD_START
    yield from (c for c in string.printable if not c.isspace())
    for length in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            word = "".join(letters)
            yield _WORD_START + word
            if length > 1:  # single letters came with printable ASCII
                yield word
