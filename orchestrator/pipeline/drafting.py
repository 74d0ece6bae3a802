"""A draft model on the orchestrator (``--speculate draft:MODEL``): the drafter of every
speculating session of a running model.

The orchestrator drafts each pass itself and sends it as a verification chunk, so the
token ring does not run for those sessions (the last stage could only draft by prompt
lookup); their sessions' plain steps and the other sessions keep the ring. The draft
model's vocabulary is checked against the target's before its weights load
(``orchcore.speculation.vocab``). One engine holds a KV session per answer being drafted;
``orch serve`` drafts from several threads, so one forward runs at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from orchcore.config import EngineConfig
from orchcore.facts import read_model_facts
from orchcore.memory import MIB, MemoryEstimate, estimate_stage
from orchcore.shard import LayerRange
from orchcore.speculation.drafters import NO_DRAFT, Draft, DraftModel
from orchcore.speculation.vocab import open_draft_model, read_vocab_facts


def draft_memory(path: Path, config: EngineConfig) -> MemoryEstimate:
    """What the draft model at ``path`` holds in this process at ``config``: the memory
    estimate of a whole model (its process terms are this process's, counted elsewhere)."""
    facts = read_model_facts(path)
    return estimate_stage(facts, LayerRange(0, facts.n_layers), config)


def held_bytes(memory: MemoryEstimate) -> int:
    """What a model adds to a process already running: the estimate without its baseline
    and serving terms."""
    return memory.total - memory.baseline - memory.serving


class HostDraft:
    """The draft model loaded on this machine, drafting greedily for many sessions."""

    def __init__(self, path: Path, target: Path, config: EngineConfig) -> None:
        self.path = Path(path)
        self.memory = draft_memory(self.path, config)
        model = open_draft_model(self.path, read_vocab_facts(target), config)  # may refuse
        self.engine = model.engine
        self._sessions: dict[str, DraftModel] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.path.name

    def describe(self) -> str:
        m = self.memory
        return (f"draft model {self.name} on this machine: {held_bytes(m) / MIB:.0f} MiB "
                f"(weights {m.weights / MIB:.0f}, KV {m.kv_cache / MIB:.0f}, logits, "
                f"vocabulary and compute {(m.logits + m.compute + m.vocab) / MIB:.0f}), "
                f"{self.engine.config.threads} thread"
                f"{'s' if self.engine.config.threads != 1 else ''}")

    def propose(self, session: str, context: Sequence[int], k: int) -> Draft:
        """Up to ``k`` greedy drafts after ``context`` (the session's tokens so far),
        feeding only what the session's draft cache does not hold yet."""
        if k <= 0:
            return NO_DRAFT
        with self._lock:
            drafter = self._sessions.get(session)
            if drafter is None:
                drafter = self._sessions[session] = DraftModel(self.engine, session)
            return drafter.propose(context, k)

    def end(self, session: str) -> None:
        """Free ``session``'s draft cache (nothing if it never drafted)."""
        with self._lock:
            if self._sessions.pop(session, None) is not None:
                self.engine.end_session(session)

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()
            self.engine.close()
