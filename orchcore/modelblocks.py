"""Random quantized blocks for generated models: random quants with f16 scales (and mins)
set so the weights come out with a chosen spread, for the types whose block layout is
known here. gguf-py cannot quantize every type; these need no quantizer."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

import gguf
import numpy as np
import numpy.typing as npt

GType = gguf.GGMLQuantizationType
MATRIX_STD = 0.02  # standard deviation of the 2-D weight matrices


class _BlockScales(NamedTuple):
    """Where a quantized block keeps its f16 scale (d) and, for some types, its min.

    Offsets are bytes from the block start (negative: from its end), as laid out in
    ggml-common.h. A min field holds `min_per_d * d`, chosen so weights centre near zero.
    """

    d_offset: int
    min_offset: int | None = None
    min_per_d: float = 0.0


_BLOCK_SCALES: Mapping[GType, _BlockScales] = {
    GType.Q8_0: _BlockScales(0),
    GType.Q4_0: _BlockScales(0),
    GType.Q4_1: _BlockScales(0, 2, -7.5),  # x = d * q + m, q in 0..15
    GType.Q5_0: _BlockScales(0),
    GType.Q5_1: _BlockScales(0, 2, -15.5),  # x = d * q + m, q in 0..31
    GType.Q4_K: _BlockScales(0, 2, 7.5),  # x = d * sc * q - dmin * m, q in 0..15
    GType.Q5_K: _BlockScales(0, 2, 15.5),  # x = d * sc * q - dmin * m, q in 0..31
    GType.Q6_K: _BlockScales(-2),  # d is the block's last field
}
RANDOM_BLOCK_TYPES: tuple[GType, ...] = tuple(_BLOCK_SCALES)


def random_blocks(rng: np.random.Generator, shape: tuple[int, ...], qtype: GType,
                  std: float = MATRIX_STD) -> npt.NDArray[np.uint8]:
    """Quantized bytes of a `shape` tensor: random quants, f16 scales giving about `std`."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    d = std / _unit_std(qtype) * rng.uniform(0.5, 1.5, size=n_blocks)
    _set_scales(blocks, qtype, d)
    return blocks.reshape(gguf.quant_shape_to_byte_shape(shape, qtype))


def _set_scales(blocks: npt.NDArray[np.uint8], qtype: GType, d: npt.NDArray[np.float64]) -> None:
    layout = _BLOCK_SCALES[qtype]
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    fields = [(layout.d_offset, d)]
    if layout.min_offset is not None:
        fields.append((layout.min_offset, layout.min_per_d * d))
    for offset, value in fields:
        start = offset % type_size
        blocks[:, start:start + 2] = value.astype(np.float16).view(np.uint8).reshape(-1, 2)


@functools.cache
def _unit_std(qtype: GType) -> float:
    """Standard deviation of random blocks with d = 1, measured with gguf's dequantizer."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(256, type_size), dtype=np.uint8)
    _set_scales(blocks, qtype, np.ones(len(blocks)))
    return float(gguf.quants.dequantize(blocks, qtype).std())
