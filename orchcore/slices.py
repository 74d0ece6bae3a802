"""Which bytes of a published model make one shard: pure, reads no file.

A worker that fetches its own slice needs each file's header (metadata and tensor table:
the shard is cut with the same code as from a whole file) and the bytes of the tensors its
layout copies. Ranges of tensors stored next to each other are merged, so a layer is one
request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from orchcore.facts import ModelFacts
from orchcore.shard import LayerRange, shard_layout

MERGE_GAP = 4096  # bytes of padding between two tensors that still make one request


@dataclass(frozen=True, order=True)
class ByteRange:
    """``length`` bytes at ``offset`` of file ``part`` of the model."""

    part: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def header_ranges(facts: ModelFacts) -> tuple[ByteRange, ...]:
    """Each file's header and tensor table: everything before its first tensor's data."""
    firsts: dict[int, int] = {}
    for t in facts.tensors:
        firsts[t.part] = min(firsts.get(t.part, t.offset), t.offset)
    return tuple(ByteRange(part, 0, firsts[part]) for part in range(len(facts.parts)))


def shard_ranges(facts: ModelFacts, layers: LayerRange) -> tuple[ByteRange, ...]:
    """The headers, then the tensor bytes the shard for ``layers`` copies (merged)."""
    layout = shard_layout(facts, layers)
    sources = [t.source for t in layout.tensors if t.source is not None]
    if layout.input_table is not None:
        sources.append(layout.input_table)
    tensors = (ByteRange(t.part, t.offset, t.n_bytes) for t in sources)
    return header_ranges(facts) + merge(tensors)


def merge(ranges: Iterable[ByteRange], gap: int = MERGE_GAP) -> tuple[ByteRange, ...]:
    """Sorted ranges, those of one file at most ``gap`` apart (or overlapping) joined."""
    out: list[ByteRange] = []
    for r in sorted(ranges):
        last = out[-1] if out else None
        if last is not None and last.part == r.part and r.offset - last.end <= gap:
            out[-1] = ByteRange(last.part, last.offset, max(last.end, r.end) - last.offset)
        else:
            out.append(r)
    return tuple(out)


def uncovered(needed: Iterable[ByteRange], have: Iterable[ByteRange]) -> list[ByteRange]:
    """The ranges of ``needed`` that ``have`` does not contain whole."""
    held = merge(have, gap=0)
    return [n for n in needed
            if not any(h.part == n.part and h.offset <= n.offset and n.end <= h.end
                       for h in held)]


def total_bytes(ranges: Iterable[ByteRange]) -> int:
    return sum(r.length for r in ranges)
