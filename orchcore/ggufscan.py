"""Walking a GGUF header by its lengths alone: where its tensor data starts, where a value
ends, and where each tensor's data lies, without decoding values. gguf-py's reader maps
every element of an array as a numpy view (seconds for a large vocabulary); this is for when
only positions matter.

``check_complete`` is the one test of a whole model file: its header parses, every tensor's
data lies inside the file, and the file ends where its last tensor ends (plus the alignment
padding). It looks at the header and the file's size only, never at tensor data, so it
holds a published file to its size before a byte of weights is fetched.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType, GGUFValueType

from orchcore.errors import CorruptGGUFError, NotGGUFError, TruncatedGGUFError

_SCALARS = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.UINT16: 2,
            GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4,
            GGUFValueType.FLOAT32: 4, GGUFValueType.BOOL: 1, GGUFValueType.UINT64: 8,
            GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}


FIRST_HEADER_BYTES = 1 << 20  # a header is read in doubling steps from this ...
MAX_HEADER_BYTES = 256 << 20  # ... up to this (the largest vocabularies take a few MiB)


@dataclass(frozen=True)
class TensorSpan:
    """One entry of the tensor table: where its data lies, relative to the data start."""

    name: str
    offset: int
    ggml_type: int  # as stored: may be a type gguf-py does not know (a corrupt file)
    n_elements: int


@dataclass(frozen=True)
class HeaderScan:
    end: int  # where the tensor data starts
    split_count: int  # files of the split set (1: a single file)
    alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT
    tensors: tuple[TensorSpan, ...] = ()
    table_end: int = 0  # where the tensor table ends (``end`` before the alignment)


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
        tensors = []
        for _ in range(n_tensors):
            span, pos = _tensor_entry(buf, pos)
            tensors.append(span)
    except (struct.error, ValueError, OverflowError):  # cut short, or a length past the end
        return None
    if pos > len(buf) or alignment == 0:
        return None
    return HeaderScan(_align(pos, alignment), split_count, alignment, tuple(tensors), pos)


def _tensor_entry(buf: bytes, pos: int) -> tuple[TensorSpan, int]:
    """The tensor table entry at ``pos`` and where the next one starts."""
    (nlen,) = struct.unpack_from("<Q", buf, pos)
    if pos + 8 + nlen > len(buf):
        raise ValueError("a tensor name runs past the end")
    name = bytes(buf[pos + 8:pos + 8 + nlen]).decode("utf-8", errors="replace")
    pos += 8 + nlen
    (n_dims,) = struct.unpack_from("<I", buf, pos)
    dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
    ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
    n_elements = 1
    for dim in dims:
        n_elements *= dim
    return TensorSpan(name, offset, ggml_type, n_elements), pos + 4 + 8 * n_dims + 12


def _align(pos: int, alignment: int) -> int:
    return -(-pos // alignment) * alignment


def check_complete(scan: HeaderScan, file_size: int, path: Path | str) -> None:
    """Raise unless a file of ``file_size`` bytes with this header is whole: every tensor's
    data lies inside it, at an aligned offset, and it ends where the last tensor's data
    ends (or at the alignment padding after it). Pure: the header and the size only.

    Raises ``TruncatedGGUFError`` (cut short), ``CorruptGGUFError`` (bytes past the last
    tensor, a tensor of an unknown type or at an unaligned offset)."""
    end = scan.table_end  # a file without tensors may end with its header
    for tensor in scan.tensors:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType(tensor.ggml_type)]
        except (ValueError, KeyError):
            raise CorruptGGUFError(path, f"tensor {tensor.name!r} has unknown type "
                                         f"{tensor.ggml_type}") from None
        if tensor.offset % scan.alignment:
            raise CorruptGGUFError(path, f"tensor {tensor.name!r} starts at data offset "
                                         f"{tensor.offset}, not a multiple of the alignment "
                                         f"{scan.alignment}")
        end = max(end, scan.end + tensor.offset + tensor.n_elements * type_size // block)
    if file_size < end:
        raise TruncatedGGUFError(path, f"cut short: its tensors end at byte {end} but it has "
                                       f"{file_size} bytes ({end - file_size} missing)")
    if file_size > _align(end, scan.alignment):
        raise CorruptGGUFError(path, f"{file_size - end} bytes follow its last tensor, which "
                                     f"ends at byte {end}: not a whole GGUF file")


def scan_file(path: Path) -> tuple[HeaderScan, bytes]:
    """What the header of ``path`` says, and its bytes (read in doubling steps, never past
    the header but for the last step). Raises ``GGUFError`` subclasses naming the file."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        if int.from_bytes(fh.read(4), "little") != gguf.GGUF_MAGIC:
            raise NotGGUFError(path, "not a GGUF file (it does not start with the GGUF magic)")
        step = FIRST_HEADER_BYTES
        while True:
            fh.seek(0)
            head = fh.read(min(step, size))
            if (scan := scan_header(head)) is not None:
                return scan, head[:scan.end]
            if len(head) >= size:
                raise TruncatedGGUFError(path, f"its GGUF header does not end within its "
                                               f"{size} bytes: cut short or corrupt")
            if step >= MAX_HEADER_BYTES:
                raise CorruptGGUFError(path, f"no complete GGUF header in its first "
                                             f"{step >> 20} MiB: corrupt")
            step *= 2


def check_file_complete(path: Path) -> HeaderScan:
    """``check_complete`` of the file at ``path`` (its header is read, no tensor data)."""
    scan = scan_file(path)[0]
    check_complete(scan, path.stat().st_size, path)
    return scan


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
