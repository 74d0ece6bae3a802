"""Hidden-state codecs: exactness, error bounds, sizes, and agreement with gguf's own Q8_0."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from orchcore.codecs import (
    CODEC_NAMES,
    CODECS,
    Codec,
    CodecError,
    UnknownCodecError,
    get_codec,
)

Q8_0 = GGMLQuantizationType.Q8_0
QK8_0, Q8_0_BYTES = GGML_QUANT_SIZES[Q8_0]

# Hidden-state sized values: large enough to exercise scales, small enough for an f16 scale.
_finite = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)
# The same without values so tiny that ggml's 1/d overflows (there it writes garbage q).
_normal = _finite.map(lambda v: v if abs(v) > 1e-30 else 0.0)


def matrices(
    max_rows: int = 6,
    max_cols: int = 200,
    cols: int | None = None,
    elements: st.SearchStrategy[float] = _finite,
) -> st.SearchStrategy[np.ndarray]:
    shape = st.tuples(
        st.integers(1, max_rows),
        st.just(cols) if cols is not None else st.integers(1, max_cols),
    )
    return arrays(np.float32, shape, elements=elements)


def rows_of_blocks() -> st.SearchStrategy[np.ndarray]:
    """Matrices whose row length is a multiple of the Q8_0 block."""
    return st.integers(1, 6).flatmap(lambda nb: matrices(cols=nb * QK8_0, elements=_normal))


def roundtrip(codec: Codec, x: np.ndarray) -> np.ndarray:
    data = codec.encode(x)
    assert len(data) == codec.encoded_size(*x.shape)
    y = codec.decode(data, *x.shape)
    assert y.dtype == np.float32
    assert y.shape == x.shape
    assert y.flags.c_contiguous
    return y


def test_registry_is_frozen_and_named() -> None:
    assert CODEC_NAMES == ("f32", "f16", "q8_0")
    for name in CODEC_NAMES:
        codec = get_codec(name)
        assert codec.name == name
        assert isinstance(codec, Codec)
    with pytest.raises(TypeError):
        CODECS["x"] = CODECS["f32"]  # type: ignore[index]


def test_unknown_codec_lists_valid_names() -> None:
    with pytest.raises(UnknownCodecError, match="f32, f16, q8_0") as info:
        get_codec("bf16")
    assert "'bf16'" in str(info.value)
    assert isinstance(info.value, ValueError)


@given(matrices())
def test_f32_roundtrip_is_exact(x: np.ndarray) -> None:
    y = roundtrip(get_codec("f32"), x)
    np.testing.assert_array_equal(y, x)
    assert len(get_codec("f32").encode(x)) == 4 * x.size


def test_f32_is_little_endian_and_keeps_non_finite() -> None:
    x = np.array([[1.0, np.nan, -np.inf]], dtype=np.float32)
    data = get_codec("f32").encode(x)
    assert data == x.astype("<f4").tobytes()
    np.testing.assert_array_equal(get_codec("f32").decode(data, 1, 3), x)


@given(matrices())
def test_f16_roundtrip_equals_numpy_half(x: np.ndarray) -> None:
    y = roundtrip(get_codec("f16"), x)
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))


def test_f16_refuses_values_beyond_half_range() -> None:
    x = np.zeros((3, 8), dtype=np.float32)
    x[2, 5] = 1e6
    with pytest.raises(CodecError, match="row 2"):
        get_codec("f16").encode(x)


def test_f16_carries_non_finite_input() -> None:
    x = np.array([[np.inf, -np.inf, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(roundtrip(get_codec("f16"), x), x)


def q8_0_bound(x: np.ndarray) -> np.ndarray:
    """Per-element error bound: half a step, plus what rounding d to f16 costs (|q| <= 127).

    The small relative and absolute slack covers float32 rounding of x / d and q * d, and
    blocks so tiny that d underflows to 0.
    """
    n_rows, n_cols = x.shape
    nb = -(-n_cols // QK8_0)
    padded = np.zeros((n_rows, nb * QK8_0), dtype=np.float32)
    padded[:, :n_cols] = x
    d = np.abs(padded.reshape(n_rows, nb, QK8_0)).max(axis=2) / np.float32(127)
    d16 = d.astype(np.float16).astype(np.float32)
    per_block = d / 2 + 127 * np.abs(d - d16) + 2e-5 * d + 1e-38
    return np.repeat(per_block, QK8_0, axis=1)[:, :n_cols]


@given(matrices(max_cols=300))
def test_q8_0_error_within_half_step(x: np.ndarray) -> None:
    y = roundtrip(get_codec("q8_0"), x)
    assert np.all(np.abs(y - x) <= q8_0_bound(x))


@pytest.mark.parametrize("n_cols", [1, 31, 32, 33, 100, 576, 2048])
def test_q8_0_size_is_34_bytes_per_32_values(n_cols: int) -> None:
    codec = get_codec("q8_0")
    blocks = -(-n_cols // QK8_0)
    assert codec.encoded_size(3, n_cols) == 3 * blocks * Q8_0_BYTES == 3 * blocks * 34
    x = np.random.default_rng(n_cols).standard_normal((3, n_cols), dtype=np.float32)
    assert len(codec.encode(x)) == codec.encoded_size(3, n_cols)


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("n_cols", [576, 100, 1])
def test_odd_lengths_roundtrip(name: str, n_cols: int) -> None:
    x = np.random.default_rng(n_cols).standard_normal((5, n_cols), dtype=np.float32) * 3
    y = roundtrip(get_codec(name), x)
    tolerance = {"f32": 0.0, "f16": 1e-2, "q8_0": 0.1}[name]
    np.testing.assert_allclose(y, x, atol=tolerance, rtol=0)


def test_q8_0_padding_does_not_change_the_row() -> None:
    """A short row encodes like the same row zero-padded to a whole block."""
    x = np.arange(1, 11, dtype=np.float32).reshape(1, 10)
    padded = np.zeros((1, QK8_0), dtype=np.float32)
    padded[0, :10] = x
    codec = get_codec("q8_0")
    assert codec.encode(x) == codec.encode(padded)


def test_q8_0_all_zero_block_has_zero_scale() -> None:
    x = np.zeros((2, 64), dtype=np.float32)
    x[1, 40] = 127.0  # d = 1: exact
    codec = get_codec("q8_0")
    data = codec.encode(x)
    y = codec.decode(data, 2, 64)
    assert not np.isnan(y).any()
    np.testing.assert_array_equal(y, x)
    assert data[:2] == b"\x00\x00"  # first block's f16 scale is +0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_q8_0_rejects_non_finite_input(bad: float) -> None:
    x = np.ones((3, 40), dtype=np.float32)
    x[1, 35] = bad
    with pytest.raises(CodecError, match="row 1 holds NaN or inf"):
        get_codec("q8_0").encode(x)


def test_q8_0_rejects_values_too_large_for_an_f16_scale() -> None:
    x = np.ones((1, 32), dtype=np.float32)
    x[0, 0] = 1e8
    with pytest.raises(CodecError, match="too large"):
        get_codec("q8_0").encode(x)


@settings(max_examples=200)
@given(rows_of_blocks())
def test_q8_0_matches_gguf_quantize_and_dequantize(x: np.ndarray) -> None:
    codec = get_codec("q8_0")
    data = codec.encode(x)
    assert data == quants.quantize(x, Q8_0).tobytes()
    raw = np.frombuffer(data, dtype=np.uint8).reshape(x.shape[0], -1)
    expected = quants.dequantize(raw, Q8_0)
    np.testing.assert_array_equal(codec.decode(data, *x.shape), expected)


def test_q8_0_rounds_ties_away_from_zero_like_ggml() -> None:
    # max 127 gives d = 1, so every x / d is exact: ties must go away from zero, as C roundf.
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, :6] = [127.0, 0.5, 1.5, 2.5, -0.5, -2.5]
    x[0, 6] = 0.49999997  # trunc(x + 0.5) would give 1
    y = get_codec("q8_0").decode(get_codec("q8_0").encode(x), 1, 32)
    np.testing.assert_array_equal(y[0, :7], [127.0, 1.0, 2.0, 3.0, -1.0, -3.0, 0.0])
    assert get_codec("q8_0").encode(x) == quants.quantize(x, Q8_0).tobytes()


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("delta", [-1, 1, -34])
def test_wrong_byte_length_raises_with_expected_and_got(name: str, delta: int) -> None:
    codec = get_codec(name)
    data = codec.encode(np.ones((2, 64), dtype=np.float32))
    bad = data[:delta] if delta < 0 else data + b"\x00" * delta
    expected = codec.encoded_size(2, 64)
    with pytest.raises(CodecError, match=f"needs {expected} bytes, got {len(bad)} bytes"):
        codec.decode(bad, 2, 64)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_of_a_mistaken_shape_raises(name: str) -> None:
    codec = get_codec(name)
    data = codec.encode(np.ones((2, 64), dtype=np.float32))
    with pytest.raises(CodecError):
        codec.decode(data, 3, 64)
    with pytest.raises(CodecError, match="non-negative"):
        codec.decode(data, -2, 64)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_accepts_buffers_and_returns_writable_arrays(name: str) -> None:
    codec = get_codec(name)
    x = np.full((2, 40), 127.0, dtype=np.float32)  # exact in every codec
    data = codec.encode(x)
    for buffer in (data, bytearray(data), memoryview(data)):
        y = codec.decode(buffer, 2, 40)
        y[0, 0] = 7.0  # the caller owns the result
        np.testing.assert_array_equal(y[1], x[1])
    assert codec.decode(data, 2, 40)[0, 0] == 127.0


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_empty_batch_roundtrips(name: str) -> None:
    codec = get_codec(name)
    x = np.zeros((0, 576), dtype=np.float32)
    assert codec.encode(x) == b""
    assert codec.decode(b"", 0, 576).shape == (0, 576)


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize(
    "bad",
    [
        np.ones(8, dtype=np.float32),  # 1-D
        np.ones((1, 2, 8), dtype=np.float32),  # 3-D
        np.ones((2, 8), dtype=np.int32),  # not floating point
        [[1.0, 2.0]],  # not an array
    ],
)
def test_encode_rejects_wrong_inputs(name: str, bad: object) -> None:
    with pytest.raises(CodecError):
        get_codec(name).encode(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_encode_accepts_other_float_layouts(name: str) -> None:
    """float64, big-endian or strided input encodes like the same values as float32."""
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    codec = get_codec(name)
    reference = codec.encode(x)
    assert codec.encode(x.astype(np.float64)) == reference
    assert codec.encode(x.astype(">f4")) == reference
    assert codec.encode(np.asfortranarray(x)) == reference
