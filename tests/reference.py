"""The unsplit baseline: a GGUF run whole by llama-cpp-python in this process.

Deliberately independent of orchcore.engine: plain low-level llama-cpp-python calls on the
original file, token input, logits out. The only setting shared with the engine is the one
the pinned build needs on AMX CPUs (extra buffer types off).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np

from orchcore.cpu import use_extra_buffer_types
from orchcore.llama_ext import llama_log


class ReferenceModel:
    def __init__(self, path: Path, *, n_ctx: int = 512, threads: int = 2) -> None:
        llama_log()  # llama.cpp's log to logging, not stderr
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = use_extra_buffer_types()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        assert self.model, f"reference load failed: {path}"
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self.pos = 0

    def tokenize(self, text: str) -> list[int]:
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        buf = (llama_cpp.llama_token * 4096)()
        n = llama_cpp.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 4096,
                                     True, True)
        assert n > 0
        return list(buf[:n])

    def detokenize(self, tokens: list[int]) -> str:
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        buf = ctypes.create_string_buffer(256)
        out = b""
        for tok in tokens:
            n = llama_cpp.llama_token_to_piece(vocab, tok, buf, 256, 0, True)
            out += buf.raw[:n]
        return out.decode("utf-8", errors="replace")

    def eval(self, tokens: list[int], all_logits: bool = True) -> np.ndarray:
        b = self.batch
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = self.pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_logits or i == len(tokens) - 1
        b.n_tokens = len(tokens)
        assert llama_cpp.llama_decode(self.ctx, b) == 0
        self.pos += len(tokens)
        rows = range(len(tokens)) if all_logits else [len(tokens) - 1]
        return np.stack([
            np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i),
                                  shape=(self.n_vocab,)).copy()
            for i in rows
        ])

    def greedy(self, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
        """Prompt logits (all rows), then ``steps`` greedy decode steps' logits."""
        logits = [self.eval(prompt)]
        generated: list[int] = []
        for _ in range(steps):
            generated.append(int(np.argmax(logits[-1][-1])))
            logits.append(self.eval([generated[-1]]))
        return generated, logits

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)
