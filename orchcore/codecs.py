"""Hidden-state codecs: how a block of residual-stream rows travels between workers.

A hidden-state message holds ``n_rows`` rows (tokens) of ``n_cols`` values (``n_embd``),
float32 in memory. The codec is chosen once per run and both ends look it up by name:

* ``f32``  raw little-endian float32, exact.
* ``f16``  IEEE half precision, little-endian; half the bytes, ~3 significant digits.
* ``q8_0`` ggml's Q8_0 applied row by row: blocks of 32 values, each one little-endian
  f16 scale ``d = max|x| / 127`` followed by 32 int8 ``q = roundf(x / d)``; 34 bytes per
  32 values. A row whose length is not a multiple of 32 is padded with zeros up to the
  next block; the true row length travels as ``n_cols`` next to the bytes, and ``decode``
  trims the padding. Encoding is bit-identical to ``gguf.quants.quantize`` (and so to
  ggml's ``quantize_row_q8_0_ref``) for rows that need no padding.

The byte layout carries no header: the shape is part of the message that carries the bytes,
and ``decode`` checks the byte count against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, NoReturn, Protocol, runtime_checkable

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from orchcore.errors import OrchError

__all__ = [
    "CODECS",
    "CODEC_NAMES",
    "Codec",
    "CodecError",
    "F16Codec",
    "F32Codec",
    "Q8_0Codec",
    "UnknownCodecError",
    "get_codec",
]

_F32: Final = np.dtype("<f4")
_F16: Final = np.dtype("<f2")
_F32_TINY: Final = np.finfo(np.float32).tiny  # smallest normal float32
_F16_MAX: Final = float(np.finfo(np.float16).max)  # 65504

# Block geometry comes from gguf's table, not re-typed: (values per block, bytes per block).
_Q8_0_BLOCK_SIZE, _Q8_0_TYPE_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
# One Q8_0 block as ggml lays it out (block_q8_0: ggml_half d; int8_t qs[QK8_0]).
_Q8_0_BLOCK: Final = np.dtype([("d", _F16), ("qs", np.int8, (_Q8_0_BLOCK_SIZE,))])
_Q8_MAX: Final = int(np.iinfo(np.int8).max)  # 127: d = max|x| / 127
# Largest max|x| whose scale d = max|x| / 127 is finite in f16.
_Q8_0_MAX_ABS: Final = np.float32(_Q8_MAX * _F16_MAX)
_FOLD_MIN_BLOCKS: Final = 128  # see _block_absmax


class CodecError(OrchError, ValueError):
    """Data cannot be encoded or decoded with the chosen codec."""


class UnknownCodecError(OrchError, ValueError):
    """No codec has the requested name."""


@runtime_checkable
class Codec(Protocol):
    """Turns an ``[n_rows, n_cols]`` float32 matrix into bytes and back."""

    @property
    def name(self) -> str: ...

    def encode(self, x: np.ndarray) -> bytes: ...

    def decode(self, data: bytes, n_rows: int, n_cols: int) -> np.ndarray: ...

    def encoded_size(self, n_rows: int, n_cols: int) -> int: ...


def _as_rows(x: np.ndarray) -> np.ndarray:
    """Validate a hidden-state matrix and return it as C-contiguous little-endian float32."""
    if not isinstance(x, np.ndarray):
        raise CodecError(f"expected a numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise CodecError(f"expected a 2-D [n_rows, n_cols] array, got shape {x.shape}")
    if x.dtype.kind != "f":
        raise CodecError(f"expected a floating-point array, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=_F32)


def _check_shape(n_rows: int, n_cols: int) -> None:
    if n_rows < 0 or n_cols < 0:
        raise CodecError(f"shape must be non-negative, got ({n_rows}, {n_cols})")


def _check_length(codec: str, data: bytes, n_rows: int, n_cols: int, expected: int) -> None:
    got = memoryview(data).nbytes
    if got != expected:
        raise CodecError(f"{codec}: {n_rows}x{n_cols} needs {expected} bytes, got {got} bytes")


class F32Codec:
    """Raw little-endian float32: exact, 4 bytes per value."""

    name: Final = "f32"

    def encoded_size(self, n_rows: int, n_cols: int) -> int:
        _check_shape(n_rows, n_cols)
        return n_rows * n_cols * _F32.itemsize

    def encode(self, x: np.ndarray) -> bytes:
        return _as_rows(x).tobytes()

    def decode(self, data: bytes, n_rows: int, n_cols: int) -> np.ndarray:
        _check_length(self.name, data, n_rows, n_cols, self.encoded_size(n_rows, n_cols))
        # Copy: a writable array the caller owns, not a read-only view of the message.
        out = np.frombuffer(data, dtype=_F32).reshape(n_rows, n_cols)
        return out.astype(np.float32, copy=True)


class F16Codec:
    """IEEE half precision: 2 bytes per value.

    A finite value that rounds beyond the half range (|x| >= 65520) would become inf, so
    encode refuses it; NaN and inf in the input are carried as they are.
    """

    name: Final = "f16"

    def encoded_size(self, n_rows: int, n_cols: int) -> int:
        _check_shape(n_rows, n_cols)
        return n_rows * n_cols * _F16.itemsize

    def encode(self, x: np.ndarray) -> bytes:
        rows = _as_rows(x)
        if rows.size == 0 or np.abs(rows).max() <= _F16_MAX:  # the common case: one check
            return rows.astype(_F16).tobytes()
        with np.errstate(over="ignore"):
            half = rows.astype(_F16)
        overflow = np.isinf(half) & np.isfinite(rows)
        if overflow.any():
            row = int(np.argwhere(overflow)[0, 0])
            raise CodecError(
                f"f16: row {row} holds a value beyond the f16 range (max {_F16_MAX:g}); "
                f"use the f32 codec for this model"
            )
        return half.tobytes()

    def decode(self, data: bytes, n_rows: int, n_cols: int) -> np.ndarray:
        _check_length(self.name, data, n_rows, n_cols, self.encoded_size(n_rows, n_cols))
        half = np.frombuffer(data, dtype=_F16).reshape(n_rows, n_cols)
        return half.astype(np.float32)


def _block_absmax(blocks: np.ndarray) -> np.ndarray:
    """max |x| of each row of ``blocks``; NaN propagates.

    ``.max(axis=1)`` reduces each short row on its own; from about 128 blocks on, folding
    halves with np.maximum is faster (2x at 32768 blocks), below it costs more calls.
    """
    a = np.abs(blocks)
    if a.shape[0] < _FOLD_MIN_BLOCKS:
        return a.max(axis=1)
    while a.shape[1] > 1 and a.shape[1] % 2 == 0:
        half = a.shape[1] // 2
        a = np.maximum(a[:, :half], a[:, half:])
    return a.max(axis=1) if a.shape[1] > 1 else a[:, 0]


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C ``roundf`` (ties away from zero), in place; every step is exact in float32.

    ``np.rint`` rounds ties to even and ``trunc(v + 0.5)`` misrounds 0.49999997,
    so take the integer part and add the rounded fraction: ``trunc(2 * frac)`` is 0 or +-1.
    """
    whole = np.trunc(v)
    np.subtract(v, whole, out=v)
    np.multiply(v, 2, out=v)
    np.trunc(v, out=v)
    np.add(v, whole, out=v)
    return v


class Q8_0Codec:
    """ggml Q8_0 per row: 34 bytes per 32 values, error per value at most ~d/2."""

    name: Final = "q8_0"
    block_size: Final = _Q8_0_BLOCK_SIZE

    def _blocks_per_row(self, n_cols: int) -> int:
        return -(-n_cols // self.block_size)

    def encoded_size(self, n_rows: int, n_cols: int) -> int:
        _check_shape(n_rows, n_cols)
        return n_rows * self._blocks_per_row(n_cols) * _Q8_0_BLOCK.itemsize

    def encode(self, x: np.ndarray) -> bytes:
        rows = _as_rows(x)
        n_rows, n_cols = rows.shape
        nb = self._blocks_per_row(n_cols)
        if nb * self.block_size != n_cols:
            padded = np.zeros((n_rows, nb * self.block_size), dtype=np.float32)
            padded[:, :n_cols] = rows
            rows = padded
        blocks = rows.reshape(-1, self.block_size)

        amax = _block_absmax(blocks)
        if amax.size and not amax.max() <= _Q8_0_MAX_ABS:  # NaN, inf, or d beyond f16
            bad = int(np.argmin(amax <= _Q8_0_MAX_ABS))
            self._raise_unencodable(rows, bad // nb)
        d = amax / np.float32(_Q8_MAX)

        # As ggml: q = roundf(x * (1/d)); an all-zero block gets q = 0. Clamping d keeps 1/d
        # finite where ggml's overflows (d subnormal, q garbage there); such a block's f16
        # scale is 0, so it decodes to zeros either way.
        inv = np.float32(1) / np.maximum(d, _F32_TINY)
        out = np.empty(blocks.shape[0], dtype=_Q8_0_BLOCK)
        out["d"] = d  # float32 -> float16, round to nearest even, as ggml's fp32_to_fp16
        out["qs"] = _round_half_away(blocks * inv[:, None])  # whole numbers in [-127, 127]
        return out.tobytes()

    @staticmethod
    def _raise_unencodable(rows: np.ndarray, row: int) -> NoReturn:
        if not np.isfinite(rows[row]).all():
            raise CodecError(f"q8_0: row {row} holds NaN or inf, which q8_0 cannot carry")
        raise CodecError(
            f"q8_0: row {row} holds a value too large for an f16 block scale "
            f"(max |x| = {float(np.abs(rows[row]).max()):g}); use the f32 codec"
        )

    def decode(self, data: bytes, n_rows: int, n_cols: int) -> np.ndarray:
        _check_length(self.name, data, n_rows, n_cols, self.encoded_size(n_rows, n_cols))
        blocks = np.frombuffer(data, dtype=_Q8_0_BLOCK)
        values = blocks["qs"] * blocks["d"].astype(np.float32)[:, None]
        values = values.reshape(n_rows, self._blocks_per_row(n_cols) * self.block_size)
        if values.shape[1] != n_cols:
            values = np.ascontiguousarray(values[:, :n_cols])
        return values


CODECS: Final[Mapping[str, Codec]] = MappingProxyType(
    {codec.name: codec for codec in (F32Codec(), F16Codec(), Q8_0Codec())}
)
CODEC_NAMES: Final[tuple[str, ...]] = tuple(CODECS)


def get_codec(name: str) -> Codec:
    """Return the codec called ``name``; raise UnknownCodecError listing the valid names."""
    try:
        return CODECS[name]
    except KeyError:
        raise UnknownCodecError(
            f"unknown hidden-state codec {name!r}; valid codecs: {', '.join(CODEC_NAMES)}"
        ) from None
