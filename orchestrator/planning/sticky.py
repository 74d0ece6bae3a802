"""The last cut of each model on each set of workers, kept in the orchestrator's cache, so
the same cluster and model keep the same plan: no re-cut, no shard sent again, just
because a measurement moved a little (``PlanOptions.prefer``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from orchcore.devices import DeviceFacts
from orchcore.facts import ModelFacts
from orchcore.files import read_json, write_atomic
from orchestrator.planning.plan import Plan, PlanOptions

log = logging.getLogger(__name__)


class PlanBook:
    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def _key(facts: ModelFacts, devices: Sequence[DeviceFacts], options: PlanOptions) -> str:
        engine = options.engine
        workers = ",".join(sorted(d.worker_id for d in devices))
        return (f"{facts.path.name}:{facts.file_size}:{workers}:{options.objective}:"
                f"{engine.context_tokens}x{engine.max_sessions}:{options.use_all}")

    def last(self, facts: ModelFacts, devices: Sequence[DeviceFacts], options: PlanOptions
             ) -> tuple[tuple[str, int, int], ...]:
        cut = read_json(self.path).get(self._key(facts, devices, options), [])
        return tuple((str(w), int(a), int(b)) for w, a, b in cut)

    def keep(self, facts: ModelFacts, devices: Sequence[DeviceFacts], options: PlanOptions,
             plan: Plan) -> None:
        book = read_json(self.path)
        book[self._key(facts, devices, options)] = [
            [s.device.worker_id, s.layers.start, s.layers.end] for s in plan.stages]
        try:
            write_atomic(self.path, json.dumps(book, indent=1))
        except OSError as exc:
            log.debug("cannot keep the plan in %s: %s", self.path, exc)
