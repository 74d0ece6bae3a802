"""Opening GGUF files: gguf-py's reader, checked (every tensor inside the file, named when it
is not) and quick on long arrays, kept per file version so one model cut into several shards
is parsed once; and a gguf-split set's files, found from the first (``split_part_paths``).
``orchcore.facts`` reads facts through it; the shard writer opens files with ``open_gguf``.
"""

from __future__ import annotations

import logging
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
from gguf import SHARD_NAME_FORMAT, GGMLQuantizationType, GGUFValueType, Keys

from orchcore.errors import (
    CorruptGGUFError,
    GGUFError,
    NotGGUFError,
    TruncatedGGUFError,
    UnsupportedModelError,
)
from orchcore.ggufscan import skip_value

log = logging.getLogger(__name__)

_READABLE_VERSIONS = (2, gguf.GGUF_VERSION)  # what gguf-py's reader accepts
# Smallest possible GGUF header: magic, version, tensor count, kv count.
_MIN_HEADER_BYTES = 4 + 4 + 8 + 8


def type_bytes(ggml_type: GGMLQuantizationType, n_elements: int) -> int:
    """Bytes of ``n_elements`` values of ``ggml_type`` (whole blocks)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    return n_elements * type_size // block_size


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader that checks every tensor lies inside the file before mapping it, and steps
    over the elements of very long arrays.

    gguf-py would otherwise fail with a bare reshape error; we name the tensor.
    ``_build_tensors`` is the reader's hook that receives the parsed tensor-info fields.

    gguf-py maps every element of an array as a numpy view of its own: a 262k-token
    vocabulary took 17 s. Arrays of ``LONG_ARRAY`` or more elements (tokenizer lists, which
    neither the facts nor the shards carry) are walked by their lengths alone: their field
    keeps its types and its length part but no elements (``contents()`` is empty).
    """

    LONG_ARRAY = 10_000

    def _get_field_parts(self, orig_offs: int, raw_type: int
                         ) -> tuple[int, list[np.ndarray], list[int], list[GGUFValueType]]:
        if raw_type == GGUFValueType.ARRAY and self.byte_order == "I":
            item_type, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4,
                                                                          np.uint64)
            if int(count[0]) >= self.LONG_ARRAY:
                try:
                    end = skip_value(memoryview(self.data), orig_offs, GGUFValueType.ARRAY)
                except struct.error:  # as gguf-py's own reads would fail: cut short
                    raise ValueError(f"array at {orig_offs} runs past the end") from None
                return (end - orig_offs, [item_type, count], [],
                        [GGUFValueType.ARRAY, GGUFValueType(int(item_type[0]))])
        return super()._get_field_parts(orig_offs, raw_type)

    def stepped_over(self) -> list[str]:
        """Keys whose long array was not read."""
        return [k for k, f in self.fields.items() if f.types[:1] == [GGUFValueType.ARRAY]
                and not f.data and int(f.parts[-1][0]) >= self.LONG_ARRAY]

    def _build_tensors(self, start_offs: int, fields: list[gguf.ReaderField]) -> None:
        file_size = len(self.data)
        for field in fields:
            _len, name_data, _n_dims, dims, raw_dtype, offset_tensor = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                ggml_type = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise _TensorProblem(CorruptGGUFError,
                                     f"tensor {name!r} has unknown type {int(raw_dtype[0])}"
                                     ) from None
            n_bytes = type_bytes(ggml_type, int(np.prod(dims.astype(np.uint64))))
            start = start_offs + int(offset_tensor[0])
            if start + n_bytes > file_size:
                raise _TensorProblem(
                    TruncatedGGUFError,
                    f"tensor {name!r} data [{start}, {start + n_bytes}) lies past the end of "
                    f"the file ({file_size} bytes): truncated or corrupt file"
                )
        super()._build_tensors(start_offs, fields)


class _WholeReader(_CheckedReader):
    """Every element read: for a file with a long array outside the tokenizer."""

    LONG_ARRAY = 1 << 62


class _TensorProblem(Exception):
    def __init__(self, error: type[GGUFError], message: str) -> None:
        super().__init__(message)
        self.error = error


def open_gguf(path: Path | str) -> gguf.GGUFReader:
    """A parsed header of ``path`` for the shard writer, shared while the file is unchanged.

    gguf-py parses metadata arrays (the tokenizer's 50k-150k strings) in Python, which
    takes seconds on large vocabularies, so cutting one model into several shards parses
    it once. Only the two most recent files are kept. For a split set, this is the first
    file's header: it holds the model's metadata, but only that file's tensors.
    """
    return cached_reader(*file_version(Path(path)))


def forget_parsed_headers() -> None:
    """Drop the parsed headers kept for the shard writer (a large vocabulary's take over
    100 MiB): a worker calls this once its shard is cut."""
    cached_reader.cache_clear()


FileVersion = tuple[Path, int, int]  # (resolved path, mtime, size) of one file


def file_version(path: Path) -> FileVersion:
    """``(resolved path, mtime, size)``: the cache key of a file's current contents."""
    if not path.is_file():
        open_reader(path)  # raises the typed error naming the problem
    stat = path.stat()
    return path.resolve(), stat.st_mtime_ns, stat.st_size


@lru_cache(maxsize=2)
def cached_reader(path: Path, _mtime_ns: int, _size: int) -> gguf.GGUFReader:
    return open_reader(path)


def open_reader(path: Path) -> gguf.GGUFReader:
    if not path.exists():
        raise NotGGUFError(path, "no such file")
    if not path.is_file():
        raise NotGGUFError(path, "not a regular file")
    size = path.stat().st_size
    if size < _MIN_HEADER_BYTES:
        raise TruncatedGGUFError(path, f"only {size} bytes, shorter than a GGUF header")
    with path.open("rb") as f:
        magic = int.from_bytes(f.read(4), "little")
        version = int.from_bytes(f.read(4), "little")
    if magic != gguf.GGUF_MAGIC:
        raise NotGGUFError(path, f"not a GGUF file (magic {magic:#010x}, expected "
                                 f"{gguf.GGUF_MAGIC:#010x})")
    if version not in _READABLE_VERSIONS:
        raise CorruptGGUFError(path, f"GGUF version {version}: only versions "
                                     f"{', '.join(map(str, _READABLE_VERSIONS))} can be read")
    try:
        reader = _CheckedReader(path)
        if any(not key.startswith("tokenizer.") for key in reader.stepped_over()):
            reader = _WholeReader(path)  # a long array a shard would carry
        return reader
    except _TensorProblem as exc:
        raise exc.error(path, str(exc)) from None
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError,
            MemoryError) as exc:
        # gguf-py reads past the end as short arrays, which then fail to unpack/reshape:
        # its message speaks of numpy, not of the file, so it only goes to the debug log.
        log.debug("%s: gguf-py could not parse the header: %r", path, exc)
        raise CorruptGGUFError(path, f"the header cannot be read: the file ({size} bytes) "
                                     f"is truncated or corrupt; download it again") from None


def scalar(reader: gguf.GGUFReader, key: str, path: Path, default: Any = None) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is None:
            raise UnsupportedModelError(path, f"missing metadata key {key!r}")
        return default
    return field.contents()


def widest(value: Any) -> int:
    """A per-model width, or the largest of per-layer widths (some models list them)."""
    return max(int(v) for v in value) if isinstance(value, list) else int(value)


def metadata_of(reader: gguf.GGUFReader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("tokenizer.ggml."):
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > 64:
            continue
        out[key] = field.contents()
    return out


# The keys gguf-split adds to every file of a set; they describe files, not the model.
_SPLIT_NO, _SPLIT_COUNT, _SPLIT_TENSORS = SPLIT_KEYS = (
    Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT,
    Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)


def split_part_paths(first: Path | str, count: int) -> tuple[Path, ...]:
    """The files of a ``count``-file gguf-split set, named after its ``first``, in order.

    llama.cpp's naming: ``m-00001-of-00003.gguf`` -> ``m-00001-of-00003.gguf``,
    ``m-00002-of-00003.gguf``, ``m-00003-of-00003.gguf`` in the same folder. A model in one
    file (``count`` 1) is its own set, whatever its name. Pure: looks at no file.
    """
    first = Path(first)
    if count < 1:
        raise ValueError(f"a split set has at least one file, not {count}")
    if count == 1:
        return (first,)
    suffix = SHARD_NAME_FORMAT.format("", 1, count)
    if not first.name.endswith(suffix) or first.name == suffix:
        raise UnsupportedModelError(
            first, f"the first of {count} split files must be named NAME{suffix}, as "
                   f"llama.cpp finds the other files by that name; rename the files")
    prefix = first.name.removesuffix(suffix)
    return tuple(first.with_name(SHARD_NAME_FORMAT.format(prefix, no, count))
                 for no in range(1, count + 1))


class Split(NamedTuple):
    """A file's place in its gguf-split set; an ordinary file is file 0 of 1."""

    no: int  # index of the file in the set, from 0
    count: int  # files in the set
    n_tensors: int | None  # tensors of the whole set, as the set's files state it


def split_of(reader: gguf.GGUFReader, path: Path) -> Split:
    fields = (reader.get_field(key) for key in SPLIT_KEYS)
    no, count, n_tensors = (None if f is None else int(f.contents()) for f in fields)
    split = Split(no or 0, 1 if count is None else count, n_tensors)
    if not 0 <= split.no < split.count:
        raise CorruptGGUFError(path, f"{_SPLIT_NO} {split.no} does not fit {_SPLIT_COUNT} "
                                     f"{split.count}: download the model again")
    return split


def first_file_name(path: Path, split: Split) -> str:
    """The name of the first file of the set ``path`` belongs to (``NAME`` if unknown)."""
    suffix = SHARD_NAME_FORMAT.format("", split.no + 1, split.count)
    prefix = path.name.removesuffix(suffix) if path.name.endswith(suffix) else "NAME"
    return SHARD_NAME_FORMAT.format(prefix, 1, split.count)
