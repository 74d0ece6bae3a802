"""Each stage's worker as the page shows it: asked every ``every_s`` whether it answers and
still holds its stage, and how much memory that stage takes there.

``up``: it answers and holds its stage; ``faulty``: it answers, but its stage reported a
fault or it no longer holds the stage; ``down``: it does not answer (or the pipeline found
it dead). A worker not asked yet is ``checking``. Why a worker is down goes to the log,
not to the page."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Literal

from orchcore.errors import OrchError
from orchestrator.cluster.client import WorkerClient
from orchestrator.pipeline.session import RunningModel

log = logging.getLogger(__name__)

State = Literal["checking", "up", "faulty", "down"]


@dataclass(frozen=True)
class WorkerHealth:
    state: State
    resident_bytes: int | None = None  # what its stage holds in memory, as it says


class HealthWatch:
    """The last answer of each stage's worker to ``Info``, refreshed by ``watch``."""

    def __init__(self, model: RunningModel, every_s: float, deadline_s: float) -> None:
        self.model, self.every_s, self.deadline_s = model, every_s, deadline_s
        self._seen: dict[str, WorkerHealth] = {}

    def of(self, address: str) -> WorkerHealth:
        if address in self.model.path.failed:
            return WorkerHealth("down")
        return self._seen.get(address, WorkerHealth("checking"))

    async def watch(self) -> None:
        """Ask every stage's worker, every ``every_s``, until cancelled."""
        while True:
            path = self.model.path
            found = await asyncio.gather(*(asyncio.to_thread(self._ask, c, path.pipeline_id)
                                           for c in path.clients))
            self._seen = {c.address: h for c, h in zip(path.clients, found, strict=True)}
            await asyncio.sleep(self.every_s)

    def _ask(self, client: WorkerClient, pipeline_id: str) -> WorkerHealth:
        try:
            info = client.info(self.deadline_s)
        except OrchError as exc:
            log.debug("worker %s does not answer: %s", client.address, exc)
            return WorkerHealth("down")
        loaded = info.loaded
        if loaded is None or loaded.pipeline_id != pipeline_id:
            return WorkerHealth("faulty")
        return WorkerHealth("faulty" if loaded.fault is not None else "up",
                            loaded.resident_bytes or None)
