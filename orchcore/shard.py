"""Shards: one contiguous layer range of a GGUF model as a standalone GGUF file.

The layout (which tensors a shard holds, under which names, with which metadata) is a pure
function of the model facts and the range: ``shard_layout``. ``write_shard`` streams the
bytes: memory use does not depend on the model size, and the same inputs always give the
same bytes (no timestamps, fixed order), so shards are cached by sha256.

What each shard carries (llama.cpp loads every one of them as an ordinary model):

* every shard: its layers renumbered from 0, ``block_count`` = its layer count, global
  tensors such as ``rope_freqs``, and the final norm (the loader requires it; ``n_embd``
  floats).
* non-final shards: ``vocab_size = 1`` and a 1-row zero ``token_embd``: no vocabulary, no
  lm head; their lm head costs one dot product and the engine stops the graph before it.
  No tokenizer either: ``tokenizer.ggml.model = "none"`` (llama.cpp then makes dummy
  tokens up to ``{arch}.vocab_size``).
* the final shard carries the model's ``tokenizer.*`` keys as they are: the stage that
  samples needs each token's text for a grammar (``worker.sampler``). Its lm head is the
  same matrix product either way.
* the final shard: the lm head as ``output.weight`` (the embedding, for tied models), and
  a ``token_embd`` of zeros of the smallest type, which llama.cpp checks the shape of but
  never reads (the final shard takes hidden states, not tokens). The lm head is then held
  once: a tied ``token_embd`` would be loaded twice where llama.cpp repacks its type for
  the matrix product (Q8_0 on ARM with dotprod: measured 29 MiB more on the 135M). The
  product is the same, as llama.cpp multiplies by the same weights with the same kernel.
  Architectures whose loader requires ``output.weight`` (``Architecture.explicit_output``)
  also carry a 1-row zero ``output.weight`` in their other shards.
* what the architecture's table (``orchcore.archs``) rewrites: per-layer metadata arrays
  sliced to the range, sliding-window flags of its own layers, the input scale.
* the first shard of a chain of two or more, untied model: the real embedding matrix,
  stored after the GGUF tensor data (an *input table* that llama.cpp never sees; see
  ``docs/shard-format.md``). The worker looks rows up with ggml's own dequantisation
  (``ggml_get_type_traits(type)->to_float``, the function llama.cpp's CPU ``get_rows``
  calls), and feeds them as embeddings, so the first stage costs no lm-head memory.
* tied embeddings split in two or more (format 4): the table is held once, by the last
  shard as its ``output.weight``. The first shard holds no table; each chunk brings its
  tokens' rows as the file stores them (``Chunk.rows``): the orchestrator reads those it
  sends from the model, the last stage those the token ring sends from its
  ``output.weight``. The first shard records the rows' type (and scale); the last one
  records that its ``output.weight`` is the embedding.
* a shard holding every layer is the model itself.
* an *exit shard* (``write_exit_shard``) holds layers ``[0, K)`` of a deeper model with the
  model's final norm, lm head and tokenizer, laid out as a whole model of K layers: the
  early-exit drafter, which shares the model's vocabulary by construction. Its metadata
  says so (``orch.shard.exit``): it is the last shard of its chain though K is below the
  source's layer count.

A model in several files (a gguf-split set) gives the same shards, byte for byte, as the
same model in one file: each tensor is copied from the file holding it, and the ``split.*``
keys, which describe the source's files, are left out (a shard is one file).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, Keys

from orchcore.archs import Rewrite
from orchcore.diskspace import THIS_MACHINE, full_disk, is_disk_full, require_free
from orchcore.errors import LayerRangeError
from orchcore.facts import (
    OUTPUT,
    OUTPUT_NORM,
    SPLIT_KEYS,
    TOKEN_EMBD,
    ModelFacts,
    TensorFacts,
    read_model_facts,
    rename_block,
)
from orchcore.files import sha256_file
from orchcore.ggufread import open_gguf, type_bytes

# Bumped whenever the bytes of a shard for the same source and range change.
# 3: the last shard carries the model's tokenizer (grammar-constrained sampling needs it).
# 4: tied embeddings are held once, by the last shard; the first takes rows with each chunk.
SHARD_FORMAT = 4

# Metadata keys of our own, under a namespace no GGUF reader interprets.
KEY_LAYER_START = "orch.shard.layer_start"
KEY_LAYER_END = "orch.shard.layer_end"
KEY_SOURCE_LAYERS = "orch.shard.source_layers"
KEY_SOURCE_VOCAB = "orch.shard.source_vocab_size"
KEY_INPUT_TYPE = "orch.shard.input_embedding.type"
KEY_INPUT_ROWS = "orch.shard.input_embedding.rows"
KEY_INPUT_OFFSET = "orch.shard.input_embedding.offset"  # relative to the data section
KEY_INPUT_SCALE = "orch.shard.input_embedding.scale"  # f32 the rows are multiplied by
KEY_INPUT_FED = "orch.shard.input_embedding.fed"  # bool: rows come with each chunk (tied)
KEY_OUTPUT_EMBEDS = "orch.shard.output_is_embedding"  # bool: the ring sends its rows (tied)
KEY_EXIT = "orch.shard.exit"  # bool: the lm head follows layer_end < source_layers
NO_VOCAB = "none"

_COPY_CHUNK = 4 << 20


@dataclass(frozen=True, order=True)
class LayerRange:
    """Half-open range of layers ``[start, end)``."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end <= self.start:
            raise LayerRangeError(f"layer range [{self.start}, {self.end}) is empty or negative")

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"

    def check_within(self, n_layers: int, what: str = "the model") -> None:
        if self.end > n_layers:
            raise LayerRangeError(
                f"layer range {self} lies outside [0, {n_layers}) of {what}"
            )


def even_ranges(n_layers: int, n_parts: int) -> tuple[LayerRange, ...]:
    """Cut ``n_layers`` into ``n_parts`` contiguous ranges differing by at most one layer."""
    if not 1 <= n_parts <= n_layers:
        raise LayerRangeError(f"cannot cut {n_layers} layers into {n_parts} non-empty ranges")
    bounds = [round(i * n_layers / n_parts) for i in range(n_parts + 1)]
    return tuple(LayerRange(a, b) for a, b in pairwise(bounds))


def ranges_from_cuts(n_layers: int, cuts: Iterable[int]) -> tuple[LayerRange, ...]:
    """``ranges_from_cuts(30, [1, 29])`` -> ``[0,1) [1,29) [29,30)``."""
    bounds = [0, *cuts, n_layers]
    return tuple(LayerRange(a, b) for a, b in pairwise(bounds))


@dataclass(frozen=True)
class ShardTensor:
    """One tensor of a shard: copied from ``source`` or, when None, written as zeros."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order
    n_bytes: int
    source: TensorFacts | None


@dataclass(frozen=True)
class ShardLayout:
    source: Path
    source_parts: tuple[Path, ...]  # the source's files; a tensor's ``part`` indexes them
    arch: str
    layers: LayerRange
    n_source_layers: int
    n_source_vocab: int
    vocab_size: int
    tensors: tuple[ShardTensor, ...]
    input_table: TensorFacts | None  # first stage of an untied chain: rows for lookup
    alignment: int
    fed_input: TensorFacts | None = None  # first stage of a tied chain: rows come with
    #                                      each chunk; the source's table, for its type
    output_embeds: bool = False  # last stage of a tied chain: output.weight is the table
    exit: bool = False  # an exit shard: [0, K) and the head, a whole model of K layers

    @property
    def is_first(self) -> bool:
        return self.layers.start == 0

    @property
    def is_last(self) -> bool:
        return self.layers.end == self.n_source_layers or self.exit

    def padded(self, n: int) -> int:
        return -(-n // self.alignment) * self.alignment

    @property
    def data_bytes(self) -> int:
        return sum(self.padded(t.n_bytes) for t in self.tensors)

    @property
    def total_tensor_bytes(self) -> int:
        extra = self.input_table.n_bytes if self.input_table else 0
        return sum(t.n_bytes for t in self.tensors) + extra


def _copied(tensor: TensorFacts, name: str | None = None) -> ShardTensor:
    return ShardTensor(name or tensor.name, tensor.ggml_type, tensor.shape, tensor.n_bytes, tensor)


def shard_layout(facts: ModelFacts, layers: LayerRange, *, exit: bool = False) -> ShardLayout:
    """Which tensors the shard for ``layers`` holds. Pure: reads no file.

    ``exit``: the exit shard of ``layers`` = ``[0, K)``, the model's first K layers as a
    whole model of K layers (embedding, final norm, lm head, vocabulary).
    """
    facts.require_supported()
    explicit_output = facts.architecture.explicit_output
    layers.check_within(facts.n_layers, str(facts.path))
    if exit and (layers.start != 0 or layers.end == facts.n_layers):
        raise LayerRangeError(f"an exit shard holds layers [0, K) with 0 < K < "
                              f"{facts.n_layers} of {facts.path}; got {layers}")
    first, last = layers.start == 0, layers.end == facts.n_layers or exit
    by_name = facts.by_name
    embd = by_name[TOKEN_EMBD]
    tensors: list[ShardTensor] = [_copied(t) for t in facts.global_tensors]
    if first and last:
        tensors.append(_copied(embd))
    elif last:
        tensors.append(_zeros(TOKEN_EMBD, _unread_type(facts.n_embd), facts.n_embd,
                              facts.n_vocab))
    else:
        tensors.append(_zeros(TOKEN_EMBD, GGMLQuantizationType.F32, facts.n_embd, 1))
    for layer in range(layers.start, layers.end):
        tensors += [_copied(t, rename_block(t.name, layer - layers.start))
                    for t in facts.layer_tensors(layer)]
    if OUTPUT_NORM in by_name:
        tensors.append(_copied(by_name[OUTPUT_NORM]))
    if last and not first:
        tensors.append(_copied(embd if facts.tied_output else by_name[OUTPUT], OUTPUT))
    elif last and not facts.tied_output:
        tensors.append(_copied(by_name[OUTPUT]))
    elif explicit_output and not last:
        tensors.append(_zeros(OUTPUT, GGMLQuantizationType.F32, facts.n_embd, 1))
    return ShardLayout(
        source=facts.path,
        source_parts=facts.parts,
        arch=facts.arch,
        layers=layers,
        n_source_layers=facts.n_layers,
        n_source_vocab=facts.n_vocab,
        vocab_size=facts.n_vocab if last else 1,
        tensors=tuple(tensors),
        input_table=embd if first and not last and not facts.tied_output else None,
        alignment=facts.alignment,
        fed_input=embd if first and not last and facts.tied_output else None,
        output_embeds=last and not first and facts.tied_output,
        exit=exit,
    )


def exit_layout(facts: ModelFacts, k: int) -> ShardLayout:
    """The exit shard of the first ``k`` layers (``shard_layout(..., exit=True)``)."""
    return shard_layout(facts, LayerRange(0, k), exit=True)


def _zeros(name: str, ggml_type: GGMLQuantizationType, row: int, rows: int) -> ShardTensor:
    return ShardTensor(name, ggml_type, (row, rows), type_bytes(ggml_type, row * rows), None)


# A token_embd llama.cpp checks the shape of but never reads (the last shard of a model
# that keeps output.weight takes embeddings, not tokens): zeros of the smallest type whose
# block fits the row. Nothing dequantizes it, so the type needs no valid data.
_UNREAD_TYPES = (GGMLQuantizationType.IQ1_S, GGMLQuantizationType.Q4_0,
                 GGMLQuantizationType.F16, GGMLQuantizationType.F32)


def _unread_type(row: int) -> GGMLQuantizationType:
    return next(t for t in _UNREAD_TYPES if row % gguf.GGML_QUANT_SIZES[t][0] == 0)


@dataclass(frozen=True)
class ShardFile:
    path: Path
    sha256: str
    size: int
    layout: ShardLayout


def _shard_metadata(facts: ModelFacts, reader: gguf.GGUFReader, layout: ShardLayout
                    ) -> list[tuple[str, Any, GGUFValueType, GGUFValueType | None]]:
    """Metadata of the shard, in the source's key order, then our own keys.

    ``reader`` is the header of the source's (first) file; its ``split.*`` keys are dropped.
    The architecture's table says which keys are sliced to the range and rewritten.
    """
    arch, table = facts.arch, facts.architecture
    start, end = layout.layers.start, layout.layers.end
    sliced = set(table.sliced_keys)
    rewrites: dict[str, Rewrite | None] = {
        Keys.LLM.BLOCK_COUNT.format(arch=arch): Rewrite(len(layout.layers), GGUFValueType.UINT32),
        Keys.LLM.VOCAB_SIZE.format(arch=arch): Rewrite(layout.vocab_size, GGUFValueType.UINT32),
    }
    if table.sliding_window is not None:
        rewrites |= table.sliding_window.rewrites(arch, facts.swa_layers[start:end])
    out: list[tuple[str, Any, GGUFValueType, GGUFValueType | None]] = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in rewrites:
            continue
        if key.startswith("tokenizer.") and not layout.is_last:
            continue  # the vocabulary is read only where tokens are sampled
        if key in SPLIT_KEYS:
            continue
        if key == Keys.General.ARCHITECTURE:
            continue  # GGUFWriter writes it first from its ``arch`` argument
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        value = _long_array(reader, field) if _stepped_over(field) else field.contents()
        if vtype == GGUFValueType.ARRAY and not value:
            continue  # gguf-py cannot write empty arrays; llama.cpp treats them as absent
        if key in sliced and isinstance(value, list) and len(value) == facts.n_layers:
            value = value[start:end]
        out.append((key, value, vtype, sub))
    out += [(key, r.value, r.vtype, r.sub_type) for key, r in rewrites.items() if r is not None]
    if not layout.is_last:
        out.append((Keys.Tokenizer.MODEL, NO_VOCAB, GGUFValueType.STRING, None))
    out.append((KEY_LAYER_START, start, GGUFValueType.UINT32, None))
    out.append((KEY_LAYER_END, end, GGUFValueType.UINT32, None))
    out.append((KEY_SOURCE_LAYERS, facts.n_layers, GGUFValueType.UINT32, None))
    out.append((KEY_SOURCE_VOCAB, facts.n_vocab, GGUFValueType.UINT32, None))
    if layout.exit:
        out.append((KEY_EXIT, True, GGUFValueType.BOOL, None))
    return out + _embedding_keys(facts, layout)


def _embedding_keys(facts: ModelFacts, layout: ShardLayout
                    ) -> list[tuple[str, Any, GGUFValueType, GGUFValueType | None]]:
    """Where the first shard's token rows come from (its input table, or each chunk), the
    scale they take, and whether the last shard's ``output.weight`` is the embedding."""
    out: list[tuple[str, Any, GGUFValueType, GGUFValueType | None]] = []
    scale = facts.architecture.input_scale
    if layout.input_table is not None:
        table_facts = layout.input_table
        out.append((KEY_INPUT_TYPE, int(table_facts.ggml_type), GGUFValueType.UINT32, None))
        out.append((KEY_INPUT_ROWS, table_facts.shape[1], GGUFValueType.UINT32, None))
        out.append((KEY_INPUT_OFFSET, layout.data_bytes, GGUFValueType.UINT64, None))
    if layout.fed_input is not None:
        out.append((KEY_INPUT_TYPE, int(layout.fed_input.ggml_type), GGUFValueType.UINT32,
                    None))
        out.append((KEY_INPUT_FED, True, GGUFValueType.BOOL, None))
    looks_up = layout.input_table is not None or layout.fed_input is not None
    if looks_up and scale is not None:
        out.append((KEY_INPUT_SCALE, scale(facts.n_embd),
                    GGUFValueType.FLOAT32, None))
    if layout.output_embeds:
        out.append((KEY_OUTPUT_EMBEDS, True, GGUFValueType.BOOL, None))
    return out


def _stepped_over(field: gguf.ReaderField) -> bool:
    """A long array the header reader did not read (``facts._CheckedReader``)."""
    return field.types[:1] == [GGUFValueType.ARRAY] and not field.data and \
        int(field.parts[-1][0]) > 0


def _long_array(reader: gguf.GGUFReader, field: gguf.ReaderField) -> list[Any]:
    """The elements of a long array (a tokenizer's 50k-262k tokens) read from the file in
    one pass: strings as their raw bytes (written back unchanged), numbers as numbers."""
    buf = memoryview(reader.data)
    pos = field.offset + 8 + len(field.name.encode()) + 4  # key length, key, value type
    item, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if GGUFValueType(item) != GGUFValueType.STRING:
        dtype = np.dtype(reader.gguf_scalar_to_np[GGUFValueType(item)]).newbyteorder("<")
        return np.frombuffer(buf, dtype, count, pos).tolist()
    out = []
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", buf, pos)
        out.append(bytes(buf[pos + 8:pos + 8 + n]))
        pos += 8 + n
    return out


ProgressFn = Callable[[int, int], None]


def write_shard(
    source: Path | str,
    layers: LayerRange,
    dest: Path | str,
    *,
    facts: ModelFacts | None = None,
    progress: ProgressFn | None = None,
    machine: str | None = THIS_MACHINE,
) -> ShardFile:
    """Write the shard for ``layers`` of ``source`` to ``dest`` atomically; return its hash.

    Its bytes must fit on ``dest``'s disk first (``DiskFullError`` names ``machine``, the
    folder and the numbers; a worker passes None: the orchestrator names it); a disk that
    fills up anyway leaves no partial file."""
    source, dest = Path(source), Path(dest)
    facts = facts or read_model_facts(source)
    layout = shard_layout(facts, layers)
    return _write_layout(source, facts, layout, dest, f"the shard of layers {layers}",
                         progress, machine)


def write_exit_shard(
    source: Path | str,
    k: int,
    dest: Path | str,
    *,
    facts: ModelFacts | None = None,
    progress: ProgressFn | None = None,
    machine: str | None = THIS_MACHINE,
) -> ShardFile:
    """Write the exit shard of the first ``k`` layers of ``source`` to ``dest`` (as
    ``write_shard`` writes a shard): a whole model of ``k`` layers that llama.cpp opens on
    its own, the early-exit drafter of the source."""
    source, dest = Path(source), Path(dest)
    facts = facts or read_model_facts(source)
    layout = exit_layout(facts, k)
    return _write_layout(source, facts, layout, dest, f"the exit shard of layers {layout.layers}",
                         progress, machine)


def _write_layout(source: Path, facts: ModelFacts, layout: ShardLayout, dest: Path,
                  doing: str, progress: ProgressFn | None, machine: str | None) -> ShardFile:
    require_free(dest.parent, layout.total_tensor_bytes, doing, machine)
    reader = open_gguf(source)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        _write(layout, _shard_metadata(facts, reader, layout), tmp, progress)
        digest = sha256_file(tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        if is_disk_full(exc):
            raise full_disk(dest.parent, layout.total_tensor_bytes, doing,
                            machine=machine) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return ShardFile(dest, digest, dest.stat().st_size, layout)


def _write(layout: ShardLayout, metadata: list, tmp: Path, progress: ProgressFn | None) -> None:
    writer = gguf.GGUFWriter(tmp, layout.arch)
    writer.data_alignment = layout.alignment
    for key, value, vtype, sub in metadata:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for tensor in layout.tensors:
        writer.add_tensor_info(tensor.name, tuple(reversed(tensor.shape)),
                               np.dtype(np.float32), tensor.n_bytes, raw_dtype=tensor.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    out = writer.fout[0]
    writer.write_padding(out, out.tell())
    total, done = layout.total_tensor_bytes, 0
    blobs = [(t.source, t.n_bytes) for t in layout.tensors]
    if layout.input_table is not None:
        blobs.append((layout.input_table, layout.input_table.n_bytes))
    with ExitStack() as stack:
        files = {part: stack.enter_context(layout.source_parts[part].open("rb"))
                 for part in sorted({t.part for t, _ in blobs if t is not None})}
        for tensor, n_bytes in blobs:
            if tensor is None:
                out.write(bytes(n_bytes))
            else:
                _copy_range(files[tensor.part], tensor.offset, n_bytes, out)
            writer.write_padding(out, n_bytes)
            done += n_bytes
            if progress:
                progress(done, total)
    out.flush()
    os.fsync(out.fileno())
    writer.close()


def _copy_range(src: Any, offset: int, n_bytes: int, out: Any) -> None:
    src.seek(offset)
    buf = bytearray(min(_COPY_CHUNK, max(n_bytes, 1)))
    view = memoryview(buf)
    left = n_bytes
    while left:
        got = src.readinto(view[:min(left, len(buf))])
        if not got:
            raise OSError(f"{src.name}: unexpected end of file at {offset + n_bytes - left}")
        out.write(view[:got])
        left -= got

