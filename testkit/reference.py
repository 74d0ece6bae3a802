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
    def __init__(self, path: Path, *, n_ctx: int = 512, threads: int = 2, n_seq: int = 1
                 ) -> None:
        llama_log()  # llama.cpp's log to logging, not stderr
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = use_extra_buffer_types()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        assert self.model, f"reference load failed: {path}"
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * n_seq  # n_ctx per sequence, each in a KV stream of its own
        cparams.n_seq_max = n_seq
        cparams.kv_unified = False
        cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self.positions = [0] * n_seq  # next position of each sequence

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
        return self.eval_batch([(0, tokens)], all_logits)

    def eval_batch(self, parts: list[tuple[int, list[int]]], all_logits: bool = False
                   ) -> np.ndarray:
        """Several sequences' tokens in one ``llama_decode``: ``parts`` is (sequence, tokens)
        in batch order. Logits of every row, or of each part's last row."""
        b, i, wanted = self.batch, 0, []
        for seq, tokens in parts:
            for j, tok in enumerate(tokens):
                b.token[i] = tok
                b.pos[i] = self.positions[seq] + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = all_logits or j == len(tokens) - 1
                if b.logits[i]:
                    wanted.append(i)
                i += 1
            self.positions[seq] += len(tokens)
        b.n_tokens = i
        assert llama_cpp.llama_decode(self.ctx, b) == 0
        return np.stack([
            np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i),
                                  shape=(self.n_vocab,)).copy()
            for i in wanted
        ])

    def rollback(self, length: int, seq: int = 0) -> None:
        """Drop sequence ``seq``'s positions from ``length`` onward (rejected drafts)."""
        mem = llama_cpp.llama_get_memory(self.ctx)
        assert llama_cpp.llama_memory_seq_rm(mem, seq, length, -1), "seq_rm refused"
        self.positions[seq] = length

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


def kl_per_row(want: np.ndarray, got: np.ndarray) -> np.ndarray:
    """KL(want || got) of the next-token distributions behind two ``[rows, n_vocab]``
    logit arrays, per row, in nats (float64 throughout)."""
    p, q = (x.astype(np.float64) - x.max(-1, keepdims=True) for x in (want, got))
    p -= np.log(np.exp(p).sum(-1, keepdims=True))
    q -= np.log(np.exp(q).sum(-1, keepdims=True))
    return (np.exp(p) * (p - q)).sum(-1)


def whole_llama(path: Path, **kwargs: object) -> llama_cpp.Llama:
    """llama-cpp-python's high-level ``Llama`` on ``path``, as a user would open it, with the
    one setting this CPU needs (extra buffer types off where ``use_extra_buffer_types``
    says so: its AMX kernels crash) and flash attention on, as llama.cpp's default (auto)
    picks on CPU and the stage engine gets (``Llama`` turns it off unless asked)."""
    binding = llama_cpp.llama_cpp  # the module ``Llama`` calls the C functions through
    default_params = binding.llama_model_default_params

    def params() -> llama_cpp.llama_model_params:
        p = default_params()
        p.use_extra_bufts = use_extra_buffer_types()
        return p

    binding.llama_model_default_params = params
    try:
        return llama_cpp.Llama(str(path), verbose=False, flash_attn=True, **kwargs)
    finally:
        binding.llama_model_default_params = default_params
