"""Where a shard sits in its chain (``StageRole``), read from the shard's own metadata: its
layer range among the source model's layers, whether it is the first (an input table, or
rows fed with each chunk) or the last (the lm head; an exit shard, the first K layers with
the head, is first and last at once). Pure: facts in, a value out."""

from __future__ import annotations

from dataclasses import dataclass

from orchcore.errors import CorruptGGUFError
from orchcore.facts import ModelFacts
from orchcore.shard import (
    KEY_EXIT,
    KEY_INPUT_FED,
    KEY_INPUT_OFFSET,
    KEY_INPUT_ROWS,
    KEY_INPUT_SCALE,
    KEY_INPUT_TYPE,
    KEY_LAYER_END,
    KEY_LAYER_START,
    KEY_OUTPUT_EMBEDS,
    KEY_SOURCE_LAYERS,
)


@dataclass(frozen=True)
class StageRole:
    """Where a shard sits in its chain, read from the shard's own metadata."""

    start: int
    end: int
    source_layers: int
    input_type: int | None  # ggml type of the first stage's input table
    input_offset: int | None  # byte offset of the table in the file
    input_rows: int | None
    input_scale: float | None = None  # the table's rows are multiplied by it (float32)
    input_fed: bool = False  # the first stage of a tied chain: rows come with each chunk
    output_embeds: bool = False  # the last stage of a tied chain: output.weight is the table
    exit: bool = False  # an exit shard: layers [0, end) with the head, end < source_layers

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.source_layers or self.exit

    @classmethod
    def of(cls, facts: ModelFacts) -> StageRole:
        meta = facts.metadata
        if KEY_LAYER_START not in meta:  # an ordinary model file: the whole model
            return cls(0, facts.n_layers, facts.n_layers, None, None, None)
        offset = meta.get(KEY_INPUT_OFFSET)
        fed = bool(meta.get(KEY_INPUT_FED, False))
        try:
            role = cls(
                start=int(meta[KEY_LAYER_START]),
                end=int(meta[KEY_LAYER_END]),
                source_layers=int(meta[KEY_SOURCE_LAYERS]),
                input_type=int(meta[KEY_INPUT_TYPE]) if offset is not None or fed else None,
                input_offset=facts.data_offset + int(offset) if offset is not None else None,
                input_rows=int(meta[KEY_INPUT_ROWS]) if offset is not None else None,
                input_scale=float(meta[KEY_INPUT_SCALE]) if KEY_INPUT_SCALE in meta else None,
                input_fed=fed,
                output_embeds=bool(meta.get(KEY_OUTPUT_EMBEDS, False)),
                exit=bool(meta.get(KEY_EXIT, False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptGGUFError(facts.path, f"incomplete shard metadata ({exc!r}); cut "
                                               f"the shard again") from None
        if not 0 <= role.start < role.end <= role.source_layers:
            raise CorruptGGUFError(facts.path, f"shard layers [{role.start}, {role.end}) do "
                                               f"not lie within {role.source_layers} layers")
        if role.exit and role.start != 0:
            raise CorruptGGUFError(facts.path, f"an exit shard holds layers [0, K), not "
                                               f"[{role.start}, {role.end}); cut it again")
        return role
