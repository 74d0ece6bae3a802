"""The stage engine: one shard loaded in llama.cpp, evaluated for several sessions.

``StageEngine.forward(session, positions, tokens=... | hidden=...)`` runs the shard's
layers on a chunk of one session and returns either the residual stream after its last
layer (non-final stages) or logits (the final stage). Every session has its own sequence
in the context's KV cache; ``end_session`` frees it, and ``rollback`` drops its positions
from one onward (draft tokens the last stage rejected; with ``all_logits`` a chunk of
drafted tokens is verified in one ``llama_decode``).

The three input paths:

* a whole model (first and last stage at once): tokens go straight to llama.cpp;
* the first stage of a chain: tokens are looked up in the shard's input table with ggml's
  own dequantisation, then go in as embeddings (see ``orchcore/shard.py``), multiplied
  by the shard's input scale when its architecture scales token embeddings (llama.cpp
  scales token input only, so the stage does it, in float32 as ggml does); with tied
  embeddings the rows come with the chunk instead (``EmbeddedRows``, the file's bytes),
  and go the same way from there;
* later stages: hidden states go in as embeddings.

On CPUs with AMX the pinned build crashes in its AMX kernels unless extra buffer types
are off (FINDINGS 1); ``orchcore.cpu.use_extra_buffer_types`` decides per CPU. Non-final
stages must request an output for every row, or llama.cpp computes only the requested
rows in the last layer and the residual stream we read would be trimmed.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from orchcore.chunks import EmbeddedRows
from orchcore.config import SWA_FULL, EngineConfig
from orchcore.cpu import cpu_info, use_extra_buffer_types
from orchcore.embedrows import RowTable
from orchcore.errors import (
    ComputeError,
    ContextFullError,
    InvalidInputError,
    SessionError,
    ShardLoadError,
)
from orchcore.facts import OUTPUT, read_model_facts
from orchcore.llama_ext import EmbdBatch, GraphTap, RowDequantizer, init_backend, llama_log
from orchcore.shard import KEY_SOURCE_VOCAB
from orchcore.stagerole import StageRole

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Step:
    """One session's chunk in a forward call: its session and its consecutive positions."""

    session: str
    positions: np.ndarray  # int32


class StageEngine:
    """One shard in llama.cpp. Not thread-safe: one forward at a time (the worker queues)."""

    def __init__(self, shard_path: Path | str, config: EngineConfig | None = None, *,
                 label: str | None = None) -> None:
        self.path = Path(shard_path)
        self.label = label or str(self.path)  # how errors name this shard
        self.config = config or EngineConfig()
        self.facts = read_model_facts(self.path)
        self.facts.require_supported()
        self.role = StageRole.of(self.facts)
        self.n_embd = self.facts.n_embd
        self.n_vocab = self.facts.n_vocab
        # Token ids the first stage accepts: the source model's vocabulary (a first shard of
        # a chain keeps it in its input table, not in llama.cpp's vocab_size).
        self._token_limit = int(self.facts.metadata.get(KEY_SOURCE_VOCAB, self.n_vocab))
        init_backend()
        self._model = self._load_model()
        self._owned: list = []
        self._finalizer = weakref.finalize(self, _free, self._model, self._owned)
        cfg = self.config
        self._tap = None if self.role.is_last else GraphTap(
            f"l_out-{self.facts.n_layers - 1}", self.n_embd, cfg.batch_tokens)
        self._ctx = self._new_context()
        self._owned.append(("ctx", self._ctx))
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._embd = EmbdBatch(self.n_embd, cfg.batch_tokens)
        self._owned.append(("batch", self._embd))
        self._lookup = self._input_table()
        self._output_rows = self._output_table()
        self._tokens = None  # a token batch: only a whole model takes token ids directly
        if self.role.is_first and self._lookup is None:
            self._tokens = llama_cpp.llama_batch_init(cfg.batch_tokens, 0, 1)
            self._owned.append(("tokens", self._tokens))
        self._sessions: dict[str, int] = {}
        self._next_pos: dict[int, int] = {}

    @property
    def vocab(self) -> llama_cpp.llama_vocab_p | None:
        """The shard's vocabulary, for llama.cpp's grammar sampler: a last shard carries the
        model's tokenizer (shard format 3); None for a shard without one."""
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        return None if llama_cpp.llama_vocab_type(vocab) == llama_cpp.LLAMA_VOCAB_TYPE_NONE \
            else vocab

    # --- setup -----------------------------------------------------------------------

    def _load_model(self) -> llama_cpp.llama_model_p:
        params = llama_cpp.llama_model_default_params()
        extra = self.config.extra_buffer_types
        params.use_extra_bufts = use_extra_buffer_types() if extra is None else extra
        # With extra buffer types llama.cpp repacks weights (e.g. Q4_0) into buffers of its
        # own; memory-mapped file pages it read them from would stay resident as a second
        # copy, so the file is read instead. Without repacking, mapping keeps one copy.
        mmap = not params.use_extra_bufts if self.config.mmap is None else self.config.mmap
        params.load_mode = (llama_cpp.LLAMA_LOAD_MODE_MMAP if mmap
                            else llama_cpp.LLAMA_LOAD_MODE_NONE)
        model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not model:
            raise ShardLoadError(f"{self.label}: llama.cpp could not load the shard: "
                                 f"{llama_log().tail()}")
        return model

    def _new_context(self) -> llama_cpp.llama_context_p:
        cfg = self.config
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = cfg.max_sessions
        # One KV stream per session (kv_unified off): a session's attention spans only
        # its own cells, and one session filling up cannot take another's room.
        params.n_ctx = cfg.context_tokens * cfg.max_sessions
        params.kv_unified = False
        params.n_batch = params.n_ubatch = cfg.batch_tokens
        params.n_threads = params.n_threads_batch = cfg.threads or cpu_info().cores
        params.no_perf = True
        params.swa_full = SWA_FULL
        # Embeddings are pooled by the orchestrator over every chunk's rows: llama.cpp hands
        # out each row of the final norm, whatever pooling the model's metadata names.
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
        if self._tap is not None:
            params.cb_eval = self._tap.callback
        ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not ctx:
            raise ShardLoadError(f"{self.label}: llama.cpp could not create a context "
                                 f"({params.n_ctx} tokens): {llama_log().tail()}")
        return ctx

    def _input_table(self) -> tuple[RowTable | None, RowDequantizer, np.float32 | None] | None:
        """How the first stage of a chain gets its rows: from its input table, or (None:
        tied embeddings) with each chunk; their dequantizer and scale."""
        role = self.role
        if role.input_type is None or not role.is_first or role.is_last:
            return None
        deq = RowDequantizer(role.input_type, self.n_embd)
        table = None
        if not role.input_fed:
            table = RowTable(self.path, role.input_offset, role.input_type, self.n_embd,
                             role.input_rows)
            self._owned.append(("file", table))
        scale = None if role.input_scale is None else np.float32(role.input_scale)
        return table, deq, scale

    def _output_table(self) -> RowTable | None:
        """The last stage of a tied chain: its lm head is the embedding, whose rows the
        token ring sends stage 0."""
        if not (self.role.output_embeds and self.role.is_last):
            return None
        table = RowTable.of_tensor(self.path, self.facts.by_name[OUTPUT])
        self._owned.append(("file", table))
        return table

    @property
    def takes_rows(self) -> bool:
        """Whether each chunk must bring its tokens' embedding rows (tied embeddings)."""
        return self._lookup is not None and self._lookup[0] is None

    def embedding_rows(self, tokens: Sequence[int]) -> EmbeddedRows | None:
        """The embedding rows of ``tokens`` for stage 0, read from this last stage's lm head
        (tied embeddings); None when stage 0 needs none."""
        if self._output_rows is None:
            return None
        return self._output_rows.take(list(tokens))

    # --- sessions --------------------------------------------------------------------

    def _seq(self, session: str) -> int:
        seq = self._sessions.get(session)
        if seq is not None:
            return seq
        free = sorted(set(range(self.config.max_sessions)) - set(self._sessions.values()))
        if not free:
            raise SessionError(f"all {self.config.max_sessions} session slots are in use; "
                               f"end a session first")
        self._sessions[session] = free[0]
        self._next_pos[free[0]] = 0
        return free[0]

    @property
    def sessions(self) -> tuple[str, ...]:
        return tuple(self._sessions)

    @property
    def session_count(self) -> int:
        """Sessions holding KV cache now (safe to read from another thread)."""
        return len(self._sessions)

    def session_length(self, session: str) -> int:
        seq = self._sessions.get(session)
        return 0 if seq is None else self._next_pos[seq]

    def end_session(self, session: str) -> bool:
        """Free a session's KV cache. Returns False if it did not exist."""
        seq = self._sessions.pop(session, None)
        if seq is None:
            return False
        llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
        del self._next_pos[seq]
        return True

    def copy_session(self, source: str, target: str) -> None:
        """Give the new session ``target`` a copy of ``source``'s KV cache: it goes on from
        ``source``'s length on its own (n answers to one prompt, prefilled once). Each
        session has a KV stream of its own, so llama.cpp copies the whole stream (before
        the next decode)."""
        seq = self._sessions.get(source)
        if seq is None:
            raise SessionError(f"session {source!r} holds no KV cache here to copy")
        if target in self._sessions:
            raise SessionError(f"session {target!r} exists already; a copy starts a new one")
        new = self._seq(target)
        llama_cpp.llama_memory_seq_cp(self._memory, seq, new, -1, -1)
        self._next_pos[new] = self._next_pos[seq]

    def rollback(self, session: str, length: int) -> None:
        """Keep the first ``length`` positions of ``session`` and drop the rest of its KV
        cache (rejected draft tokens); the next forward continues at ``length``."""
        seq = self._sessions.get(session)
        current = 0 if seq is None else self._next_pos[seq]
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= current:
            raise InvalidInputError(f"session {session!r}: can roll back to a length in "
                                    f"[0, {current}], got {length!r}")
        if seq is None or length == current:
            return
        if not llama_cpp.llama_memory_seq_rm(self._memory, seq, length, -1):
            raise ComputeError(f"{self.label}: llama.cpp could not drop positions {length}.. "
                               f"of session {session!r}; end the session and start it again")
        self._next_pos[seq] = length

    # --- compute ---------------------------------------------------------------------

    def forward(
        self,
        session: str,
        positions: np.ndarray | list[int],
        *,
        tokens: np.ndarray | list[int] | None = None,
        hidden: np.ndarray | None = None,
        rows: EmbeddedRows | None = None,
        all_logits: bool = False,
        embed: bool = False,
    ) -> np.ndarray:
        """Run this stage on one chunk of ``session``.

        Returns float32 ``[n, n_embd]`` hidden states (non-final stage), or logits
        ``[n, n_vocab]`` for every row (``all_logits``) or ``[1, n_vocab]`` for the last;
        with ``embed`` the last stage returns the final norm's ``[n, n_embd]`` rows instead.
        """
        return self.forward_batch([Step(session, np.asarray(positions, dtype=np.int32))],
                                  tokens=tokens, hidden=hidden, rows=rows,
                                  all_logits=all_logits, embed=embed)

    def forward_batch(self, steps: Sequence[Step], *,
                      tokens: np.ndarray | list[int] | None = None,
                      hidden: np.ndarray | None = None, rows: EmbeddedRows | None = None,
                      all_logits: bool = False, embed: bool = False) -> np.ndarray:
        """Run one chunk of each of several sessions in one ``llama_decode``.

        Several sessions carry one row each (a decode step each), so that llama.cpp keeps
        the rows in batch order; ``tokens``/``hidden`` hold the steps' rows in order.
        Returns hidden states for every row (non-final stage), or logits for every row
        (``all_logits``) or for each step's last row; with ``embed`` the last stage
        returns the final norm's rows (llama.cpp's embeddings mode, for this call only).
        ``rows``: the tokens' embedding rows, which the first stage of a tied chain takes
        with its tokens.
        """
        n = sum(len(s.positions) for s in steps)
        if len(steps) > 1 and n != len(steps):
            raise InvalidInputError("a batch of several sessions carries one row per session")
        if len({s.session for s in steps}) != len(steps):
            raise InvalidInputError("a batch carries each session once")
        self._check_input(n, tokens, hidden)
        self._check_rows(n, rows)
        for step in steps:
            self._check_positions(step.session, self.session_length(step.session),
                                  step.positions)
        seqs = np.concatenate([np.full(len(s.positions), self._seq(s.session), np.int32)
                               for s in steps])
        positions = np.concatenate([s.positions for s in steps])
        ends = np.cumsum([len(s.positions) for s in steps]) - 1
        embed = embed and self.role.is_last
        wanted = np.ones(n, dtype=np.int8)
        if self.role.is_last and not (all_logits or embed):
            wanted[:] = 0
            wanted[ends] = 1
        if embed:
            llama_cpp.llama_set_embeddings(self._ctx, True)
        try:
            if self.role.is_first and self._lookup is None:
                self._fill_tokens(seqs, positions, np.asarray(tokens, dtype=np.int32), wanted)
                self._decode(self._tokens)
            else:
                self._fill_embd(seqs, positions, tokens, hidden, rows, wanted)
                self._decode(self._embd.batch)
        finally:
            if embed:
                llama_cpp.llama_set_embeddings(self._ctx, False)
        for step in steps:
            self._next_pos[self._sessions[step.session]] = int(step.positions[-1]) + 1
        if embed:
            return self._embeddings(n)
        if self.role.is_last:
            return self._logits(np.flatnonzero(wanted))
        if self._tap.captured_rows != n:
            raise ComputeError(f"{self.label}: expected {n} rows of {self._tap.target.decode()} "
                               f"from the graph, got {self._tap.captured_rows} "
                               f"{self._tap.problem}".rstrip())
        return self._tap.buffer[:n].copy()

    def _check_input(self, n: int, tokens: object, hidden: np.ndarray | None) -> None:
        if n == 0 or n > self.config.batch_tokens:
            raise InvalidInputError(f"a forward call carries 1..{self.config.batch_tokens} "
                                    f"rows, got {n}")
        if self.role.is_first:
            if tokens is None or hidden is not None:
                raise InvalidInputError("the first stage takes token ids, not hidden states")
            if len(tokens) != n:
                raise InvalidInputError(f"{len(tokens)} tokens for {n} positions")
            ids = np.asarray(tokens)
            if ids.min() < 0 or ids.max() >= self._token_limit:
                raise InvalidInputError(f"token id out of range: {int(ids.min())}.."
                                        f"{int(ids.max())}")
        else:
            if hidden is None or tokens is not None:
                raise InvalidInputError("this stage takes hidden states, not token ids")
            if hidden.shape != (n, self.n_embd):
                raise InvalidInputError(f"hidden states of shape {hidden.shape}, expected "
                                        f"({n}, {self.n_embd})")

    def _check_rows(self, n: int, rows: EmbeddedRows | None) -> None:
        if not self.takes_rows:
            if rows is not None:
                raise InvalidInputError("this stage looks embedding rows up itself; send "
                                        "token ids alone")
            return
        if rows is None:
            raise InvalidInputError("the first stage of a model with tied embeddings takes "
                                    "each token's embedding row with the chunk; the sender "
                                    "must attach them (update the orchestrator)")
        deq = self._lookup[1]
        if rows.ggml_type != self.role.input_type or rows.row_bytes != deq.row_bytes \
                or len(rows.data) != n * deq.row_bytes:
            raise InvalidInputError(
                f"embedding rows of type {rows.ggml_type}, {rows.row_bytes} bytes each, "
                f"{len(rows.data)} bytes for {n} tokens; this stage takes type "
                f"{self.role.input_type}, {deq.row_bytes} bytes a row")

    def _check_positions(self, session: str, expected: int, positions: np.ndarray) -> None:
        n = len(positions)
        if n == 0 or positions[0] != expected or (n > 1 and np.any(np.diff(positions) != 1)):
            raise InvalidInputError(
                f"session {session!r}: positions must continue at {expected} and be "
                f"consecutive, got {positions[0] if n else '-'}..{positions[-1] if n else '-'}")
        if positions[-1] >= self.config.context_tokens:
            raise ContextFullError(
                f"session {session!r}: position {int(positions[-1])} is past the context "
                f"length of {self.config.context_tokens} tokens (--context)")

    def _fill_tokens(self, seqs: np.ndarray, positions: np.ndarray, tokens: np.ndarray,
                     wanted: np.ndarray) -> None:
        batch = self._tokens
        for i in range(len(positions)):
            batch.token[i] = int(tokens[i])
            batch.pos[i] = int(positions[i])
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = int(seqs[i])
            batch.logits[i] = int(wanted[i])
        batch.n_tokens = len(positions)

    def _fill_embd(self, seqs: np.ndarray, positions: np.ndarray, tokens: object,
                   hidden: np.ndarray | None, rows: EmbeddedRows | None,
                   wanted: np.ndarray) -> None:
        n = len(positions)
        if self._lookup is not None:
            table, deq, scale = self._lookup
            self._embd.fill(seqs, positions, None, wanted)
            raw = rows.array() if table is None else table.raw(np.asarray(tokens).tolist())
            deq.rows(raw, self._embd.embd[:n])
            if scale is not None:
                self._embd.embd[:n] *= scale
        else:
            self._embd.fill(seqs, positions, np.ascontiguousarray(hidden, np.float32), wanted)
        if self._tap is not None:
            self._tap.reset()

    def _decode(self, batch: llama_cpp.llama_batch) -> None:
        code = llama_cpp.llama_decode(self._ctx, batch)
        if code == 0:
            return
        if code == 1:
            raise ContextFullError(f"{self.label}: no room left in the KV cache "
                                   f"({self.config.max_sessions} sessions x "
                                   f"{self.config.context_tokens} tokens)")
        if code == 2:
            raise ComputeError(f"{self.label}: decode aborted")
        if code == -1:
            raise InvalidInputError(f"{self.label}: llama.cpp rejected the batch: "
                                    f"{llama_log().tail(2)}")
        raise ComputeError(f"{self.label}: llama_decode failed with code {code}: "
                           f"{llama_log().tail(2)}")

    def _logits(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.n_vocab), dtype=np.float32)
        row_type = ctypes.c_float * self.n_vocab
        for j, i in enumerate(rows):
            ptr = llama_cpp.llama_get_logits_ith(self._ctx, int(i))
            out[j] = np.frombuffer(row_type.from_address(ctypes.addressof(ptr.contents)),
                                   dtype=np.float32)
        return out

    def _embeddings(self, n: int) -> np.ndarray:
        """The final norm's rows of the last decode (every row an output)."""
        ptr = llama_cpp.llama_get_embeddings(self._ctx)
        if not ptr:
            raise ComputeError(f"{self.label}: llama.cpp returned no embeddings: "
                               f"{llama_log().tail(2)}")
        return np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(
            n, self.n_embd).copy()

    # --- lifetime --------------------------------------------------------------------

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> StageEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _free(model: llama_cpp.llama_model_p, owned: list) -> None:
    for kind, obj in reversed(owned):
        if kind == "ctx":
            llama_cpp.llama_free(obj)
        elif kind == "batch":
            obj.free()
        elif kind == "tokens":
            llama_cpp.llama_batch_free(obj)
        elif kind == "file":
            obj.close()
    owned.clear()
    llama_cpp.llama_model_free(model)
