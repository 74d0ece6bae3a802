"""The data path's values: a chunk going down the stages, and the result coming back.

Both sides see these and nothing of the wire: ``orchcore.wire.convert`` is the one place
that turns them into protobuf messages and back. Field names follow the messages of
``proto/orch/v1/worker.proto`` (``StageInput``, ``StageOutput``, ``StageTiming``,
``Error``, ``Hidden``), whose comments say what each field means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from orchcore.codecs import get_codec
from orchcore.errors import InvalidInputError
from orchcore.sampling import SamplingParams, TokenLogprobs

NO_TOKEN = -1  # a result for a chunk that asked for no token


class Rows(NamedTuple):
    """Hidden-state rows as they travel between stages: encoded with a codec."""

    codec: str
    rows: int
    cols: int
    data: bytes

    @classmethod
    def encode(cls, x: np.ndarray, codec: str) -> Rows:
        rows, cols = x.shape
        return cls(codec, rows, cols, get_codec(codec).encode(x))

    def decode(self) -> np.ndarray:
        return get_codec(self.codec).decode(self.data, self.rows, self.cols)


class EmbeddedRows(NamedTuple):
    """Token embedding rows as the model file stores them: the quantized bytes of one row
    per token, one after the other, for stage 0 of a model with tied embeddings, which
    holds no table of its own (``docs/shard-format.md``). Stage 0 dequantizes them with
    ggml's own ``to_float``, so they are exact under every codec."""

    ggml_type: int
    row_bytes: int
    data: bytes

    @property
    def count(self) -> int:
        return len(self.data) // self.row_bytes if self.row_bytes else 0

    def array(self) -> np.ndarray:
        """The rows as ``uint8[count, row_bytes]`` (a view of ``data``)."""
        return np.frombuffer(self.data, dtype=np.uint8).reshape(self.count, self.row_bytes)

    @classmethod
    def join(cls, parts: Sequence[EmbeddedRows]) -> EmbeddedRows:
        """The rows of several chunks, in order (one type)."""
        first = parts[0]
        if any((p.ggml_type, p.row_bytes) != (first.ggml_type, first.row_bytes)
               for p in parts):
            raise InvalidInputError("embedding rows of one batch come in one type")
        return cls(first.ggml_type, first.row_bytes, b"".join(p.data for p in parts))


class StageTiming(NamedTuple):
    """What one stage spent on a chunk."""

    stage_index: int
    compute_ms: float = 0.0  # engine forward and encoding the rows sent on
    queue_ms: float = 0.0  # waiting behind other chunks
    sent_bytes: int = 0  # serialized size of the message sent on
    send_ms: float = 0.0  # serializing and handing off to the next stage


class ChunkError(NamedTuple):
    """A stage failed on a chunk: later stages pass it on, the orchestrator raises it."""

    code: str  # a name from orchcore/wire/status.py
    message: str
    worker: str  # address or id of the worker that failed


@dataclass(frozen=True)
class Chunk:
    """Token ids (and, past stage 0, hidden rows) of one session, going down the stages."""

    pipeline_id: str
    session: str
    chunk: int = 0  # numbered by the orchestrator, unique per pipeline
    start_pos: int = 0  # positions start_pos .. start_pos + len(tokens) - 1
    tokens: tuple[int, ...] = ()
    hidden: Rows | None = None  # None into stage 0
    rows: EmbeddedRows | None = None  # into stage 0 of a tied split: the tokens' rows
    want_token: bool = False  # sample after this chunk
    sampling: SamplingParams | None = None  # with the first chunk of a session
    end_session: bool = False  # free the session on every stage; no compute
    timings: tuple[StageTiming, ...] = ()  # one per stage passed
    error: ChunkError | None = None  # an earlier stage failed on it
    batched: tuple[Chunk, ...] = ()  # decode steps computed in the same batch, after it
    ring_left: int = 0  # tokens the last stage still generates on its own (the token ring)
    ring_stops: tuple[int, ...] = ()  # tokens that end the ring early
    drafted: int = 0  # the last `drafted` tokens are drafts after the pending one (verify)
    draft_k: int = 0  # the last stage drafts up to this many with each ring chunk
    draft_ahead: bool = False  # the last stage may send the ring's next step before its verdict
    ahead: bool = False  # sent before the verdict it assumes; dropped at the last stage if wrong
    # Prompt logprobs, n answers, embeddings (StageInput fields 50-53)
    score_rows: bool = False  # the last stage scores every row (prompt logprobs)
    next_token: int | None = None  # the token after this chunk, for its last row's score
    copy_to: tuple[str, ...] = ()  # sessions that get a copy of this one's KV cache after it
    embed: bool = False  # the last stage answers with the final-norm rows, not a token

    @property
    def drafts(self) -> tuple[int, ...]:
        """The drafted tokens a verification chunk carries (after the pending one)."""
        return self.tokens[len(self.tokens) - self.drafted:] if self.drafted else ()

    @property
    def verifies(self) -> bool:
        """Whether the last stage judges drafts for this chunk (logits of every row)."""
        return self.drafted > 0

    @property
    def every_row(self) -> bool:
        """Whether the last stage needs an output for every row (not only the last)."""
        return self.verifies or self.score_rows or self.embed

    @property
    def answered(self) -> bool:
        """Whether the last stage publishes a result for this chunk when it succeeds."""
        return self.want_token or self.score_rows or self.embed or self.end_session

    @property
    def members(self) -> tuple[Chunk, ...]:
        """This chunk and the steps batched with it, in batch order."""
        return (self, *self.batched)

    @property
    def positions(self) -> np.ndarray:
        return np.arange(self.start_pos, self.start_pos + len(self.tokens), dtype=np.int32)

    def failed(self, error: ChunkError) -> Chunk:
        """This chunk carrying ``error`` instead of hidden rows."""
        return replace(self, hidden=None, rows=None, error=error)

    def embedded(self) -> EmbeddedRows | None:
        """The embedding rows of this chunk and the steps batched with it, in batch order;
        None when they carry none (a stage 0 that holds its own table)."""
        parts = [m.rows for m in self.members]
        if all(p is None for p in parts):
            return None
        if any(p is None or p.count != len(m.tokens)
               for p, m in zip(parts, self.members, strict=True)):
            raise InvalidInputError(f"session {self.session!r} chunk {self.chunk}: every "
                                    f"token needs its embedding row")
        return EmbeddedRows.join(parts)  # type: ignore[arg-type]

    def without_rows(self) -> Chunk:
        """This chunk (and its batch) without embedding rows: past stage 0 no one reads
        them."""
        if all(m.rows is None for m in self.members):
            return self
        return replace(self, rows=None,
                       batched=tuple(replace(b, rows=None) for b in self.batched))

    def timed(self, timing: StageTiming) -> Chunk:
        return replace(self, timings=(*self.timings, timing))


class RowScore(NamedTuple):
    """One scored row of a prompt: the logprob of the token after it (None where the chunk
    does not know that token) and the ``top`` most likely tokens there as ``(id,
    logprob)``, most likely first."""

    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StageResult:
    """The last stage's answer for one chunk: its token, or the error on its way."""

    session: str
    chunk: int = 0
    token: int = NO_TOKEN
    timings: tuple[StageTiming, ...] = ()
    error: ChunkError | None = None
    session_ended: bool = False
    batch: tuple[int, ...] = ()  # the chunks computed in one batch with this one, in
    #                              batch order (this one included); empty when alone
    drafts: tuple[int, ...] = ()  # a verification chunk's drafts, as it carried them
    accepted: int = 0  # drafts kept: the pass added drafts[:accepted], then token
    logprobs: TokenLogprobs | None = None  # the token's, when the session asked for them
    row_scores: tuple[RowScore, ...] = ()  # a score_rows chunk's rows, in order
    embedding: Rows | None = None  # an embed chunk's final-norm rows
    ahead: bool = False  # sent before its predecessor's verdict, which kept it (overlapped)

    @property
    def tokens(self) -> tuple[int, ...]:
        """The tokens this result adds to the answer, in order (one without drafts)."""
        return (*self.drafts[:self.accepted], self.token)

    @property
    def announces_subscription(self) -> bool:
        """The Results stream's first message (no session): results reach it from now on."""
        return not self.session


SUBSCRIBED = StageResult(session="")
