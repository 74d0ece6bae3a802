"""Walking a GGUF header by its lengths alone: where its tensor data starts, and where a value
ends, without decoding values. gguf-py's reader maps every element of an array as a numpy
view (seconds for a large vocabulary); this is for when only positions matter.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import gguf
from gguf import GGUFValueType

_SCALARS = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.UINT16: 2,
            GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4,
            GGUFValueType.FLOAT32: 4, GGUFValueType.BOOL: 1, GGUFValueType.UINT64: 8,
            GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}


@dataclass(frozen=True)
class HeaderScan:
    end: int  # where the tensor data starts
    split_count: int  # files of the split set (1: a single file)


_SPLIT_COUNT = gguf.Keys.Split.LLM_KV_SPLIT_COUNT.encode()


def scan_header(buf: bytes) -> HeaderScan | None:
    """Where the tensor data of a GGUF file starts, from its first bytes ``buf``; None if the
    header and tensor table do not end within them. (gguf-py's reader parses every value
    into numpy views, seconds for a large vocabulary; this only walks the lengths.)"""
    try:
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos, alignment, split_count = 24, gguf.GGUF_DEFAULT_ALIGNMENT, 1
        for _ in range(n_kv):
            (klen,) = struct.unpack_from("<Q", buf, pos)
            key = buf[pos + 8:pos + 8 + klen]
            pos += 8 + klen
            (vtype,) = struct.unpack_from("<I", buf, pos)
            if key == b"general.alignment" and vtype == GGUFValueType.UINT32:
                (alignment,) = struct.unpack_from("<I", buf, pos + 4)
            if key == _SPLIT_COUNT and vtype == GGUFValueType.UINT16:
                (split_count,) = struct.unpack_from("<H", buf, pos + 4)
            pos = skip_value(buf, pos + 4, GGUFValueType(vtype))
        for _ in range(n_tensors):
            (nlen,) = struct.unpack_from("<Q", buf, pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos + 8 + nlen)
            pos += 8 + nlen + 4 + 8 * n_dims + 4 + 8
    except (struct.error, ValueError, OverflowError):  # cut short, or a length past the end
        return None
    if pos > len(buf) or alignment == 0:
        return None
    return HeaderScan(-(-pos // alignment) * alignment, split_count)


_MAX_NESTING = 4  # arrays of arrays; GGUF files in use have none


def skip_value(buf: bytes, pos: int, vtype: GGUFValueType, depth: int = 0) -> int:
    """Where the value of type ``vtype`` at ``pos`` ends. Raises ``struct.error`` or
    ``ValueError`` when ``buf`` ends first or holds no such value."""
    if vtype in _SCALARS:
        return pos + _SCALARS[vtype]
    if vtype == GGUFValueType.STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    (item, count) = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    item = GGUFValueType(item)
    if item in _SCALARS:
        return pos + count * _SCALARS[item]
    if depth >= _MAX_NESTING:
        raise ValueError(f"arrays nested more than {_MAX_NESTING} deep")
    for _ in range(count):
        pos = skip_value(buf, pos, item, depth + 1)
        if pos > len(buf):
            raise ValueError("an array runs past the end")
    return pos
