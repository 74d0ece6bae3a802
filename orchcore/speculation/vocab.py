"""Whether a draft model speaks the target's vocabulary: a pure check over tokenizer facts.

Draft tokens are token ids; they mean the same thing to the target only when both models
have the same tokenizer: same kind, same pre-tokenizer, the same piece at every id, the
same BOS and EOS. Logit rows may differ (a padded output matrix is fine): the draft
model only ever proposes ids of its tokenizer.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import llama_cpp
from gguf import Keys

from orchcore.config import EngineConfig
from orchcore.engine import StageEngine
from orchcore.errors import InvalidSettingError, UnsupportedModelError
from orchcore.ggufread import open_gguf
from orchcore.llama_ext import init_backend
from orchcore.speculation.drafters import DraftModel


class DraftVocabularyError(InvalidSettingError):
    """The draft model's vocabulary is not the target's."""


class VocabFacts(NamedTuple):
    model: str  # tokenizer.ggml.model: "llama", "gpt2", ...
    pre: str | None  # tokenizer.ggml.pre (BPE pre-tokenizer), if any
    pieces: tuple[bytes, ...]  # the text of each token id
    bos: int | None
    eos: int | None

    @property
    def digest(self) -> str:
        """A short fingerprint of the pieces (for logs and for comparing over the wire)."""
        h = hashlib.sha256()
        for piece in self.pieces:
            h.update(len(piece).to_bytes(4, "little") + piece)
        return h.hexdigest()[:16]


def vocab_mismatch(target: VocabFacts, draft: VocabFacts) -> str | None:
    """What differs between the two vocabularies (the first difference), or None."""
    for what, a, b in (("tokenizer", target.model, draft.model),
                       ("pre-tokenizer", target.pre, draft.pre),
                       ("token count", len(target.pieces), len(draft.pieces)),
                       ("BOS id", target.bos, draft.bos), ("EOS id", target.eos, draft.eos)):
        if a != b:
            return f"{what} {a!r} (target) vs {b!r} (draft)"
    for i, (a, b) in enumerate(zip(target.pieces, draft.pieces, strict=True)):
        if a != b:
            return f"token {i} is {a!r} (target) vs {b!r} (draft)"
    return None


def check_draft_vocab(target: VocabFacts, draft: VocabFacts, draft_name: str) -> None:
    """Raise ``DraftVocabularyError`` naming the difference, if there is one."""
    problem = vocab_mismatch(target, draft)
    if problem is not None:
        raise DraftVocabularyError(f"draft model {draft_name} cannot draft for this model: "
                                   f"{problem}; choose a draft model of the same family")


def read_vocab_facts(path: Path | str) -> VocabFacts:
    """The tokenizer facts of a GGUF (its vocabulary only is loaded, by llama.cpp)."""
    path = Path(path)
    fields = open_gguf(path).fields

    def scalar(key: str) -> object:
        field = fields.get(key)
        return None if field is None else field.contents()

    init_backend()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    params.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise UnsupportedModelError(path, "llama.cpp could not load its vocabulary")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        n = llama_cpp.llama_vocab_n_tokens(vocab)
        pieces = tuple(llama_cpp.llama_vocab_get_text(vocab, i) or b"" for i in range(n))
    finally:
        llama_cpp.llama_model_free(model)
    bos, eos = scalar(Keys.Tokenizer.BOS_ID), scalar(Keys.Tokenizer.EOS_ID)
    return VocabFacts(str(scalar(Keys.Tokenizer.MODEL)), scalar(Keys.Tokenizer.PRE), pieces,
                      None if bos is None else int(bos), None if eos is None else int(eos))


def open_draft_model(path: Path | str, target: VocabFacts, config: EngineConfig
                     ) -> DraftModel:
    """A ``DraftModel`` for ``path``, refused before loading its weights if its vocabulary
    is not ``target``'s."""
    check_draft_vocab(target, read_vocab_facts(path), Path(path).name)
    return DraftModel(StageEngine(path, config, label=f"draft model {Path(path).name}"))
