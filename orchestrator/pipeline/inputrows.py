"""The embedding rows the orchestrator sends stage 0, for a model with tied embeddings
split in two or more (shard format 4): stage 0 then holds no table, and the last stage
holds it as its lm head. Whoever sends tokens to stage 0 attaches their rows, as the model
file stores them: the orchestrator for the prompt and whatever else it sends (each pending
token with the ring off, its own drafts, a replay after a failover), the last stage for
its ring chunks. Here the rows come from the model file, or from where the model is
published by Range (``orchestrator.models.remote.RemoteRows``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from orchcore.chunks import EmbeddedRows
from orchcore.embedrows import RowTable
from orchcore.facts import TOKEN_EMBD, ModelFacts
from orchcore.shard import shard_layout
from orchestrator.models.remote import remote_rows
from orchestrator.pipeline.deploy import FromSource
from orchestrator.planning.plan import Plan


class RowSource(Protocol):
    def take(self, ids: Sequence[int]) -> EmbeddedRows: ...

    def close(self) -> None: ...


def input_rows(facts: ModelFacts, plan: Plan, source: FromSource | None = None
               ) -> RowSource | None:
    """Where the rows of the tokens sent to stage 0 of ``plan`` come from: the model file,
    or with ``source`` its published files; None when stage 0 looks its rows up itself
    (untied embeddings, or one stage holding the whole model)."""
    if shard_layout(facts, plan.stages[0].layers).fed_input is None:
        return None
    embd = facts.by_name[TOKEN_EMBD]
    if source is not None:
        return remote_rows(facts, source.files, embd)
    return RowTable.of_tensor(facts.parts[embd.part], embd)
