"""Token embedding rows read from a file: ``RowTable``, the quantized bytes of the rows of
given token ids, as the file stores them.

Three readers use it: stage 0 of an untied split, on the input table after its shard's
tensor data; the last stage of a tied split, on its ``output.weight`` (the embedding), for
the tokens the token ring sends stage 0; and the orchestrator, on the model file's
``token_embd``, for the tokens it sends itself (``docs/shard-format.md``). Rows are read
with ``pread``, one at a time, as tokens need them: a few hundred bytes per token. A
memory map would keep every row ever used resident (a slow climb of the process's RSS, up
to the whole table, measured in the soak benchmark).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from orchcore.chunks import EmbeddedRows
from orchcore.errors import ComputeError, InvalidInputError
from orchcore.facts import TensorFacts
from orchcore.ggufread import type_bytes
from orchcore.slices import ByteRange, merge


class RowTable:
    """The rows of one embedding matrix (``n_rows`` rows of ``row_len`` values of
    ``ggml_type``) at ``offset`` of ``path``. Owns a file descriptor: ``close`` it."""

    def __init__(self, path: Path | str, offset: int, ggml_type: int, row_len: int,
                 n_rows: int, part: int = 0) -> None:
        self.path, self.offset, self.part = Path(path), offset, part
        self.ggml_type, self.n_rows = int(ggml_type), n_rows
        self.row_bytes = type_bytes(self.ggml_type, row_len)
        self._fd = os.open(self.path, os.O_RDONLY)

    @classmethod
    def of_tensor(cls, path: Path | str, tensor: TensorFacts) -> RowTable:
        """The rows of ``tensor`` (GGUF shape ``(row_len, n_rows)``) in ``path``."""
        return cls(path, tensor.offset, tensor.ggml_type, tensor.shape[0], tensor.shape[1],
                   tensor.part)

    def check(self, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.n_rows]
        if bad:
            raise InvalidInputError(f"token id out of range: {bad[0]} (the vocabulary has "
                                    f"{self.n_rows} tokens)")

    def spans(self, ids: Iterable[int], gap: int = 0) -> tuple[ByteRange, ...]:
        """The byte ranges of the rows of ``ids`` (in the model's file ``part``, merged
        when at most ``gap`` bytes apart): what a sparse copy must hold to read them."""
        return merge((ByteRange(self.part, self.offset + t * self.row_bytes, self.row_bytes)
                      for t in set(ids)), gap=gap)

    def rows_within(self, ranges: Iterable[ByteRange]) -> set[int]:
        """The rows that ``ranges`` (of the model's files) hold whole."""
        rows: set[int] = set()
        for r in ranges:
            if r.part != self.part:
                continue
            first = max(0, -(-(r.offset - self.offset) // self.row_bytes))
            end = min(self.n_rows, (r.end - self.offset) // self.row_bytes)
            rows.update(range(first, end))
        return rows

    def raw(self, ids: Sequence[int]) -> np.ndarray:
        """The rows of ``ids`` as ``uint8[len(ids), row_bytes]``, checked in range."""
        self.check(ids)
        out = np.empty((len(ids), self.row_bytes), dtype=np.uint8)
        for i, row in enumerate(ids):
            data = os.pread(self._fd, self.row_bytes, self.offset + int(row) * self.row_bytes)
            if len(data) != self.row_bytes:
                raise ComputeError(f"{self.path}: embedding row {row} lies past the end of "
                                   f"the file")
            out[i] = np.frombuffer(data, dtype=np.uint8)
        return out

    def take(self, ids: Sequence[int]) -> EmbeddedRows:
        """The rows of ``ids`` as they travel to stage 0."""
        return EmbeddedRows(self.ggml_type, self.row_bytes, self.raw(ids).tobytes())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RowTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
