"""Model facts read from GGUF headers: pure data, never tensor contents.

``read_model_facts(path)`` memory-maps the file, parses the header with gguf-py and
returns an immutable ``ModelFacts``: architecture, shape, and the byte size of every layer
and of the embedding, output and norm tensors. The planner sizes layer ranges from these
numbers, the shard writer copies the tensors they describe. Key names and type sizes come
from gguf-py's tables (``gguf.Keys``, ``gguf.GGML_QUANT_SIZES``), never re-typed.

A model published as a gguf-split set (``NAME-00001-of-00003.gguf`` ...) is read from its
first file, as llama.cpp loads it: that file holds every metadata key and ``split.count``;
the other files' names follow from it (``split_part_paths``), and each file's header lists
the tensors stored in it. The facts merge them; every tensor records its file (``part``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import gguf
from gguf import (
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    Keys,
)

from orchcore.archs import ARCHITECTURES, SUPPORTED_ARCHITECTURES, Architecture, unsupported
from orchcore.errors import (
    CorruptGGUFError,
    GGUFError,
    TruncatedGGUFError,
    UnsupportedModelError,
)
from orchcore.ggufread import (
    _SPLIT_TENSORS,
    SPLIT_KEYS,
    FileVersion,
    Split,
    cached_reader,
    file_version,
    first_file_name,
    metadata_of,
    open_reader,
    scalar,
    split_of,
    split_part_paths,
    type_bytes,
    widest,
)
from orchcore.ggufscan import check_file_complete

# "blk.{bid}.attn_q" -> "blk.", the prefix every per-layer tensor name shares.
BLOCK_PREFIX = TENSOR_NAMES[MODEL_TENSOR.ATTN_Q].split("{bid}")[0]
_BLOCK_NAME = re.compile(re.escape(BLOCK_PREFIX) + r"(\d+)\.(.+)")
TOKEN_EMBD = TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight"
OUTPUT = TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight"
OUTPUT_NORM = TENSOR_NAMES[MODEL_TENSOR.OUTPUT_NORM] + ".weight"

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TensorFacts:
    """Where one tensor lives (which file of the model, where in it) and how big it is."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: shape[0] is the contiguous (row) dimension
    n_bytes: int
    offset: int  # absolute byte offset of the data in its file, ``ModelFacts.parts[part]``
    part: int = 0  # index of that file in ``ModelFacts.parts``; 0 unless a split set

    @property
    def block(self) -> int | None:
        """Layer index for ``blk.N.*`` tensors, else None."""
        match = _BLOCK_NAME.fullmatch(self.name)
        return int(match.group(1)) if match else None


def rename_block(name: str, new_block: int) -> str:
    """``blk.7.attn_q.weight`` with new_block=2 -> ``blk.2.attn_q.weight``."""
    match = _BLOCK_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"not a per-layer tensor name: {name!r}")
    return f"{BLOCK_PREFIX}{new_block}.{match.group(2)}"


@dataclass(frozen=True)
class ModelFacts:
    """What the planner and the shard writer need to know about one GGUF model."""

    path: Path  # the file llama.cpp loads: the model, or the first file of a split set
    parts: tuple[Path, ...]  # every file of the model in split order; ``(path,)`` if one
    file_size: int  # bytes of all files of the model together
    arch: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int  # feed-forward width (sizes llama.cpp's compute buffers)
    n_ctx_train: int
    n_vocab: int
    tied_output: bool  # True when the lm head is the token embedding (no output.weight)
    tensors: tuple[TensorFacts, ...]
    metadata: dict[str, Any]  # scalar and short-array keys, for display; no tokenizer lists
    data_offset: int  # start of the first file's tensor data
    alignment: int
    # Mixture of experts (0 for dense models): experts per layer, how many a token uses,
    # and the width of one expert's and of the shared expert's feed-forward.
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    sliding_window: int = 0  # tokens a sliding-window layer attends to; 0: none
    swa_layers: tuple[bool, ...] = ()  # per layer: does it use the sliding window
    nonuniform_keys: tuple[str, ...] = ()  # per-layer keys llama.cpp needs uniform, not

    @cached_property
    def by_name(self) -> dict[str, TensorFacts]:
        return {t.name: t for t in self.tensors}

    @cached_property
    def layer_bytes(self) -> tuple[int, ...]:
        """Bytes of each layer's tensors, index = layer."""
        sizes = [0] * self.n_layers
        for tensor in self.tensors:
            if tensor.block is not None:
                sizes[tensor.block] += tensor.n_bytes
        return tuple(sizes)

    @property
    def architecture(self) -> Architecture | None:
        """Its record in ``orchcore.archs``, None if orch does not split it."""
        return ARCHITECTURES.get(self.arch)

    @cached_property
    def active_layer_bytes(self) -> tuple[int, ...]:
        """Bytes of each layer one decode step reads: every tensor but the experts, and of
        those only the ``n_expert_used`` the router picks (``layer_bytes`` if dense)."""
        table = self.architecture
        if not self.n_expert or table is None:
            return self.layer_bytes
        sizes = [0] * self.n_layers
        for tensor in self.tensors:
            match = _BLOCK_NAME.fullmatch(tensor.name)
            if match is None:
                continue
            expert = table.is_expert(match.group(2))
            sizes[int(match.group(1))] += (tensor.n_bytes * self.n_expert_used // self.n_expert
                                           if expert else tensor.n_bytes)
        return tuple(sizes)

    @property
    def ffn_width(self) -> int:
        """Feed-forward values one row computes: ``n_ff``, or the used experts' and the
        shared expert's for a mixture of experts (sizes llama.cpp's compute buffer)."""
        if not self.n_expert:
            return self.n_ff
        return self.n_expert_used * self.n_ff_exp + self.n_ff_shexp

    @property
    def embedding_bytes(self) -> int:
        return self.by_name[TOKEN_EMBD].n_bytes

    @property
    def output_bytes(self) -> int:
        """Bytes of the lm head: ``output.weight``, or the embedding again when tied."""
        return self.by_name[OUTPUT].n_bytes if not self.tied_output else self.embedding_bytes

    @property
    def output_norm_bytes(self) -> int:
        tensor = self.by_name.get(OUTPUT_NORM)
        return tensor.n_bytes if tensor else 0

    @property
    def global_tensors(self) -> tuple[TensorFacts, ...]:
        """Tensors outside any layer other than embedding/output/norm (e.g. rope_freqs)."""
        special = {TOKEN_EMBD, OUTPUT, OUTPUT_NORM}
        return tuple(t for t in self.tensors if t.block is None and t.name not in special)

    def layer_tensors(self, layer: int) -> tuple[TensorFacts, ...]:
        return tuple(t for t in self.tensors if t.block == layer)

    def kv_bytes_per_token_per_layer(
        self, cache_type: GGMLQuantizationType = GGMLQuantizationType.F16
    ) -> int:
        """KV-cache bytes one token costs in one layer (K and V) for ``cache_type``."""
        k = type_bytes(cache_type, self.head_dim_k * self.n_head_kv)
        v = type_bytes(cache_type, self.head_dim_v * self.n_head_kv)
        return k + v

    @cached_property
    def support_problem(self) -> str | None:
        """Why orch cannot split this model exactly (its architecture's table), or None."""
        table = self.architecture
        return unsupported(self.arch) if table is None else table.refusal(self)

    @property
    def is_supported(self) -> bool:
        return self.support_problem is None

    def require_supported(self) -> None:
        if self.support_problem is not None:
            raise UnsupportedModelError(self.path, self.support_problem)


@contextmanager
def _arch_named(path: Path, arch: str) -> Iterator[None]:
    """A model of an unsupported architecture lacking keys or tensors: name the first."""
    try:
        yield
    except UnsupportedModelError as exc:
        if arch in SUPPORTED_ARCHITECTURES:
            raise
        raise UnsupportedModelError(path, f"{unsupported(arch)} ({exc.problem})") from None


def read_model_facts(path: Path | str) -> ModelFacts:
    """Parse the header(s) of a GGUF model: one file, or the first file of a split set.

    Raises a ``GGUFError`` subclass naming the file (for a set: the file at fault, or the
    missing one). Facts are small and kept per version of all the model's files; the parsed
    header is not (gguf-py's view of a 150k-token vocabulary takes over 150 MiB).
    """
    given = Path(path)
    first = file_version(given)
    names = split_part_paths(given, _cached_head(*first).split.count)
    rest = tuple(_part_version(name, len(names), given) for name in names[1:])
    return _cached_facts((first, *rest))


def check_model_complete(path: Path | str) -> None:
    """Raise unless the model at ``path`` is whole: the file, or every file of the split set
    it is the first of, passes ``ggufscan.check_complete`` (headers read, no tensor data)."""
    first = Path(path)
    scan = check_file_complete(first)
    for part in split_part_paths(first, scan.split_count)[1:]:
        if not part.is_file():
            raise TruncatedGGUFError(part, f"missing: the split model {first.name} has "
                                           f"{scan.split_count} files; download this one")
        check_file_complete(part)


def _part_version(path: Path, count: int, first: Path) -> FileVersion:
    if not path.exists():
        raise TruncatedGGUFError(path, f"missing: the split model {first.name} has {count} "
                                       f"files; download this one into {first.parent}")
    return file_version(path)


@dataclass(frozen=True)
class _Head:
    """What the file given for a model says: the model's keys, its own tensors, its set."""

    split: Split
    keys: dict[str, Any]  # the ModelFacts fields that come from metadata
    tensors: tuple[TensorFacts, ...]
    data_offset: int


@lru_cache(maxsize=32)
def _cached_head(path: Path, mtime_ns: int, size: int) -> _Head:
    reader = cached_reader(path, mtime_ns, size)  # the shard writer needs the same parse
    split = split_of(reader, path)
    if split.no != 0:
        raise UnsupportedModelError(
            path, f"this is file {split.no + 1} of the {split.count} files of a split model; "
                  f"give the first, {first_file_name(path, split)}, which holds its metadata")
    arch = scalar(reader, Keys.General.ARCHITECTURE, path)
    with _arch_named(path, arch):
        keys = _model_keys(path, reader, arch)
    return _Head(split, keys, _tensor_facts(reader, 0), int(reader.data_offset))


def _model_keys(path: Path, reader: gguf.GGUFReader, arch: str) -> dict[str, Any]:
    fmt = {"arch": arch}
    n_embd = int(scalar(reader, Keys.LLM.EMBEDDING_LENGTH.format(**fmt), path))
    n_head = int(scalar(reader, Keys.Attention.HEAD_COUNT.format(**fmt), path))
    n_head_kv = int(scalar(reader, Keys.Attention.HEAD_COUNT_KV.format(**fmt), path, n_head))
    if n_head <= 0 or n_embd % n_head:
        raise CorruptGGUFError(path, f"embedding length {n_embd} not divisible by "
                                     f"head count {n_head}")
    head_dim = n_embd // n_head
    n_layers = int(scalar(reader, Keys.LLM.BLOCK_COUNT.format(**fmt), path))
    return {
        "arch": arch,
        "n_layers": n_layers,
        "n_embd": n_embd,
        "n_head": n_head,
        "n_head_kv": n_head_kv,
        "head_dim_k": int(scalar(reader, Keys.Attention.KEY_LENGTH.format(**fmt), path,
                                  head_dim)),
        "head_dim_v": int(scalar(reader, Keys.Attention.VALUE_LENGTH.format(**fmt), path,
                                  head_dim)),
        "n_ff": widest(scalar(reader, Keys.LLM.FEED_FORWARD_LENGTH.format(**fmt), path,
                                4 * n_embd)),
        "n_ctx_train": int(scalar(reader, Keys.LLM.CONTEXT_LENGTH.format(**fmt), path, 0)
                           or 0),
        "metadata": metadata_of(reader),
        "alignment": int(reader.alignment),
        **_table_keys(reader, arch, n_layers),
    }


def _optional(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _first(value: Any) -> int:
    """Layer 0's value of a per-layer key (what llama.cpp uses for every layer), or 0."""
    if isinstance(value, list):
        return int(value[0]) if value else 0
    return int(value or 0)


def _table_keys(reader: gguf.GGUFReader, arch: str, n_layers: int) -> dict[str, Any]:
    """The facts an architecture's table asks for: experts, sliding-window layers."""
    table = ARCHITECTURES.get(arch)
    if table is None:
        return {}
    fmt = {"arch": arch}

    def value(key: str) -> Any:
        return _optional(reader, key)

    window = table.sliding_window
    return {
        "n_expert": _first(value(Keys.LLM.EXPERT_COUNT.format(**fmt))),
        "n_expert_used": _first(value(Keys.LLM.EXPERT_USED_COUNT.format(**fmt))),
        "sliding_window": (_first(value(window.window_key.format(**fmt)))
                           if window else 0),
        "swa_layers": (window.flags(arch, value, n_layers) if window
                       else (False,) * n_layers),
        "nonuniform_keys": tuple(key for key in table.uniform
                                 if isinstance(v := value(key), list) and len(set(v)) > 1),
    }


def _tensor_facts(reader: gguf.GGUFReader, part: int) -> tuple[TensorFacts, ...]:
    return tuple(
        TensorFacts(
            name=t.name,
            ggml_type=GGMLQuantizationType(t.tensor_type),
            shape=tuple(int(d) for d in t.shape),
            n_bytes=int(t.n_bytes),
            offset=int(t.data_offset),
            part=part,
        )
        for t in reader.tensors
    )


@lru_cache(maxsize=32)
def _cached_facts(versions: tuple[FileVersion, ...]) -> ModelFacts:
    """Facts of the model whose files are ``versions``, the first one's header cached."""
    head = _cached_head(*versions[0])
    tensors = head.tensors
    for no, (path, _, _) in enumerate(versions[1:], 1):
        tensors += _part_tensors(path, no, head.split)
    with _arch_named(versions[0][0], head.keys["arch"]):
        return _facts(head, versions, tensors)


def _part_tensors(path: Path, no: int, first: Split) -> tuple[TensorFacts, ...]:
    """The tensors file ``no`` of a split set holds, after checking its place in the set."""
    reader = open_reader(path)
    split = split_of(reader, path)
    if (split.no, split.count) != (no, first.count):
        raise CorruptGGUFError(
            path, f"its header says file {split.no + 1} of {split.count}, but it is named "
                  f"file {no + 1} of {first.count} of its split model; download it again")
    return _tensor_facts(reader, no)


def _check_set(path: Path, split: Split, tensors: tuple[TensorFacts, ...]) -> None:
    """The files of a split set hold the tensors its first file announces, each once."""
    if split.count == 1:
        return
    if split.n_tensors != len(tensors):
        raise CorruptGGUFError(
            path, f"its {split.count} split files hold {len(tensors)} tensors, but "
                  f"{_SPLIT_TENSORS} is {split.n_tensors}: download the model again")
    seen: set[str] = set()
    for tensor in tensors:
        if tensor.name in seen:
            raise CorruptGGUFError(path, f"tensor {tensor.name!r} is in two of its split "
                                         f"files: download the model again")
        seen.add(tensor.name)


def _facts(head: _Head, versions: tuple[FileVersion, ...], tensors: tuple[TensorFacts, ...]
           ) -> ModelFacts:
    path = versions[0][0]
    _check_set(path, head.split, tensors)
    names = {t.name for t in tensors}
    if TOKEN_EMBD not in names:
        raise UnsupportedModelError(path, f"no {TOKEN_EMBD} tensor")
    facts = ModelFacts(
        path=path,
        parts=tuple(part for part, _, _ in versions),
        file_size=sum(size for _, _, size in versions),
        **head.keys,
        **_expert_widths(tensors),
        n_vocab=_vocab_size(tensors, path),
        tied_output=OUTPUT not in names,
        tensors=tensors,
        data_offset=head.data_offset,
    )
    _check_layers(facts)
    return facts


# ffn_down_exps of layer 0 is (n_ff_exp, n_embd, n_expert) in GGUF order: the width of one
# expert, whatever key (or default) it came from; likewise the shared expert's ffn_down.
_DOWN_EXPERT = TENSOR_NAMES[MODEL_TENSOR.FFN_DOWN_EXP].format(bid=0) + ".weight"
_DOWN_SHARED = TENSOR_NAMES[MODEL_TENSOR.FFN_DOWN_SHEXP].format(bid=0) + ".weight"


def _expert_widths(tensors: tuple[TensorFacts, ...]) -> dict[str, int]:
    shapes = {t.name: t.shape for t in tensors if t.name in (_DOWN_EXPERT, _DOWN_SHARED)}
    return {"n_ff_exp": shapes[_DOWN_EXPERT][0] if _DOWN_EXPERT in shapes else 0,
            "n_ff_shexp": shapes[_DOWN_SHARED][0] if _DOWN_SHARED in shapes else 0}


def _vocab_size(tensors: tuple[TensorFacts, ...], path: Path) -> int:
    """Rows of the token embedding: the vocabulary the lm head scores."""
    embd = next(t for t in tensors if t.name == TOKEN_EMBD)
    if len(embd.shape) != 2:
        raise CorruptGGUFError(path, f"{TOKEN_EMBD} has shape {embd.shape}, expected 2-D")
    return int(embd.shape[1])


def _check_layers(facts: ModelFacts) -> None:
    if facts.n_layers <= 0:
        raise CorruptGGUFError(facts.path, f"block count {facts.n_layers} is not positive")
    for tensor in facts.tensors:
        if tensor.block is not None and tensor.block >= facts.n_layers:
            raise CorruptGGUFError(
                facts.path,
                f"tensor {tensor.name!r} belongs to layer {tensor.block} but the model has "
                f"{facts.n_layers} layers",
            )
    empty = [i for i, size in enumerate(facts.layer_bytes) if size == 0]
    if empty:
        raise CorruptGGUFError(facts.path, f"layers without tensors: {empty[:8]}")


__all__ = [
    "BLOCK_PREFIX",
    "OUTPUT",
    "OUTPUT_NORM",
    "SPLIT_KEYS",
    "SUPPORTED_ARCHITECTURES",
    "TOKEN_EMBD",
    "GGUFError",
    "ModelFacts",
    "TensorFacts",
    "check_model_complete",
    "read_model_facts",
    "rename_block",
    "split_part_paths",
    "type_bytes",
]
