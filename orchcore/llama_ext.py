"""Our own ctypes layer over llama.cpp: what llama-cpp-python does not bind for us.

Four things, each owning its C-side memory and callbacks:

* ``GraphTap``: an eval callback (``llama_context_params.cb_eval``) that copies one named
  graph tensor (the residual stream ``l_out-N`` after a shard's last layer) into a numpy
  buffer and then stops the graph, so a non-final stage never computes its lm head.
* ``RowDequantizer``: ggml's own ``to_float`` for a tensor type (the function the CPU
  ``get_rows`` op calls), used for the first stage's token-embedding lookup.
* ``LlamaLog``: routes llama.cpp's log to ``logging`` and keeps the last lines, so a
  failed load can say why.
* ``EmbdBatch``: a ``llama_batch`` carrying embeddings, with numpy views over its C arrays.

Everything here is bound to the llama-cpp-python build pinned in pyproject.toml; the
struct offset used by ``GraphTap`` is checked against ``ggml_get_name`` on the first node
it sees, and a mismatch is reported with the failed forward.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import deque
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

log = logging.getLogger("llama.cpp")

_LIB_DIR = Path(llama_cpp.__file__).parent / "lib"


def _load_ggml_base() -> ctypes.CDLL:
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        candidate = _LIB_DIR / name
        if candidate.exists():
            return ctypes.CDLL(str(candidate))
    raise OSError(f"libggml-base not found in {_LIB_DIR}; reinstall llama-cpp-python")


_ggml = _load_ggml_base()
_ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
_ggml.ggml_get_name.restype = ctypes.c_char_p
_ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
_ggml.ggml_nbytes.restype = ctypes.c_size_t
_ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                          ctypes.c_size_t]
_ggml.ggml_backend_tensor_get.restype = None

# void (*ggml_to_float_t)(const void * x, float * y, int64_t k)
_ToFloat = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    """``struct ggml_type_traits`` of ggml.h (pinned build)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_ggml.ggml_get_type_traits.argtypes = [ctypes.c_int]
_ggml.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)

_GGML_TYPE_F32 = int(gguf.GGMLQuantizationType.F32)  # same numbering as enum ggml_type

# Offset of ``char name[GGML_MAX_NAME]`` in ``struct ggml_tensor`` (ggml.h): type (4, padded
# to 8), buffer (8), ne[4] (32), nb[4] (32), op (4), op_params[16] (64), flags (4),
# src[10] (80), view_src (8), view_offs (8), data (8). Verified at first use.
_NAME_OFFSET = 256


class RowDequantizer:
    """Converts rows of one ggml type to float32 with ggml's own code."""

    def __init__(self, ggml_type: int, row_len: int) -> None:
        traits = _ggml.ggml_get_type_traits(ggml_type).contents
        if row_len % traits.blck_size:
            raise ValueError(f"row length {row_len} is not a multiple of the block size "
                             f"{traits.blck_size} of type {traits.type_name.decode()}")
        # F32 has no to_float: ggml's get_rows copies its rows as they are.
        self._is_f32 = ggml_type == _GGML_TYPE_F32
        if not self._is_f32 and not traits.to_float:
            raise ValueError(f"ggml type {traits.type_name.decode()} has no to_float")
        self._to_float = None if self._is_f32 else _ToFloat(traits.to_float)
        self.row_len = row_len
        self.row_bytes = row_len // traits.blck_size * traits.type_size

    def rows(self, raw: np.ndarray, out: np.ndarray) -> None:
        """``out[i] = float(raw[i])``; ``raw`` holds the bytes of one row per row."""
        if self._is_f32:
            out[:len(raw)] = raw.view(np.float32)
            return
        for i, src in enumerate(raw):
            self._to_float(src.ctypes.data, out[i].ctypes.data, self.row_len)


class GraphTap:
    """Copies the graph tensor named ``target`` out of each decode, then stops the graph.

    llama.cpp asks the callback about every node (``ask=True``, ~470 times per token on a
    30-layer model, so that path reads the name straight from the struct); answering True
    for the target makes the scheduler compute up to it and call back with ``ask=False``,
    where we copy the data and return False, which ends the computation of that split.
    """

    def __init__(self, target: str, row_len: int, max_rows: int) -> None:
        self.target = target.encode()
        probe = self.target + b"\0"
        self.buffer = np.zeros((max_rows, row_len), dtype=np.float32)
        self.row_bytes = row_len * 4
        self.captured_rows = 0
        self.problem = ""  # set when the captured tensor was not what we expected
        name_at = (ctypes.c_char * len(probe)).from_address
        unchecked = [True]

        def on_node(tensor: int, ask: bool, _user_data: int) -> bool:
            if ask:
                if unchecked[0]:
                    unchecked[0] = False
                    self._check_layout(tensor)
                return name_at(tensor + _NAME_OFFSET).raw == probe
            return self._capture(tensor)

        self.on_node = on_node  # the Python function behind ``callback`` (for profiling)
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(on_node)

    def reset(self) -> None:
        self.captured_rows = 0

    def _check_layout(self, tensor: int) -> None:
        """Once: the name read at our struct offset must be the one ggml reports."""
        name = _ggml.ggml_get_name(tensor)
        if ctypes.string_at(tensor + _NAME_OFFSET, len(name) + 1) != name + b"\0":
            self.problem = ("ggml_tensor layout differs from the pinned build (name offset); "
                            "this llama-cpp-python version is unsupported")

    def _capture(self, tensor: int) -> bool:
        if _ggml.ggml_get_name(tensor) != self.target:
            self.problem = ("ggml_tensor layout differs from the pinned build (name offset); "
                            "this llama-cpp-python version is unsupported")
            return False
        n_bytes = _ggml.ggml_nbytes(tensor)
        rows = n_bytes // self.row_bytes
        if n_bytes % self.row_bytes or self.captured_rows + rows > len(self.buffer):
            self.problem = f"{self.target.decode()} has {n_bytes} bytes, not whole rows"
            return False
        # A batch llama.cpp splits (sessions whose slots are not adjacent) comes in several
        # graphs, in batch order: each one's rows follow the previous ones'.
        _ggml.ggml_backend_tensor_get(tensor, self.buffer[self.captured_rows:].ctypes.data, 0,
                                      n_bytes)
        self.captured_rows += rows
        return False  # stop the graph: nothing after this tensor is needed


class LlamaLog:
    """llama.cpp log -> ``logging`` (debug), keeping the last lines for error messages."""

    def __init__(self, keep: int = 20) -> None:
        self.lines: deque[str] = deque(maxlen=keep)
        self._partial = ""
        self.callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes, _user_data: int) -> None:
        self._partial += text.decode("utf-8", errors="replace")
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            if line.strip(" .\t"):  # progress dots say nothing about a failure
                self.lines.append(line)
                log.debug("%s", line)

    def tail(self, n: int = 3) -> str:
        return " | ".join(list(self.lines)[-n:])

    def install(self) -> None:
        llama_cpp.llama_log_set(self.callback, ctypes.c_void_p(0))


_LOG: LlamaLog | None = None


def llama_log() -> LlamaLog:
    """The process-wide log router (installed on first use, kept alive here)."""
    global _LOG
    if _LOG is None:
        _LOG = LlamaLog()
        _LOG.install()
    return _LOG


_backend_lock = threading.Lock()
_backend_ready = False


def init_backend() -> None:
    """Route llama.cpp's log to ``logging``, then initialise its backend, once per process."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_log()
            llama_cpp.llama_backend_init()
            _backend_ready = True


class EmbdBatch:
    """A ``llama_batch`` carrying embeddings; numpy views over its C arrays.

    The rows are written into memory owned by ``llama_batch_init`` (never into a
    temporary numpy buffer whose pointer could dangle while llama.cpp reads it).
    """

    def __init__(self, n_embd: int, max_rows: int) -> None:
        self.n_embd = n_embd
        self.capacity = max_rows
        self.batch = llama_cpp.llama_batch_init(self.capacity, n_embd, 1)
        self.embd = np.ctypeslib.as_array(self.batch.embd, shape=(self.capacity, n_embd))
        self.pos = np.ctypeslib.as_array(self.batch.pos, shape=(self.capacity,))
        self.n_seq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(self.capacity,))
        self.logits = np.ctypeslib.as_array(
            ctypes.cast(self.batch.logits, ctypes.POINTER(ctypes.c_int8)), shape=(self.capacity,))
        self.seq_ptrs = [self.batch.seq_id[i] for i in range(self.capacity)]

    def fill(self, seqs: np.ndarray, positions: np.ndarray, rows: np.ndarray | None,
             output: np.ndarray) -> None:
        n = len(positions)
        if rows is not None:
            self.embd[:n] = rows
        self.pos[:n] = positions
        self.n_seq[:n] = 1
        for i in range(n):
            self.seq_ptrs[i][0] = int(seqs[i])
        self.logits[:n] = output
        self.batch.n_tokens = n

    def free(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
