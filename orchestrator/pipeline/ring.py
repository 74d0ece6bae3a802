"""The token ring, as the orchestrator sees one session's: the last stage feeds each token
it samples back to stage 0 itself, as the chunks numbered after the one sent, so after
the prompt the orchestrator only listens.

``TokenRing`` holds a ring's state (the chunk the last stage sends next and how many
tokens it still generates) and its rules: how long a ring a step asks for, how many chunk
numbers it takes, and whether it goes on after a token. ``RunningModel`` keeps one per
session while a ring runs; ``DataPath`` numbers chunks by it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenRing:
    """A running ring: the last stage sends its next step as ``chunk``, with ``left``
    tokens still to generate after that step's own."""

    chunk: int
    left: int

    @staticmethod
    def length(enabled: bool, limit: int, generated: int) -> int:
        """``ring_left`` for a step the orchestrator sends now: every token the answer may
        still generate after the step's own (0 with the ring off)."""
        return max(0, limit - generated - 1) if enabled else 0

    @staticmethod
    def numbers(ring_left: int) -> int:
        """Chunk numbers a step with ``ring_left`` takes: its own, then one per ring step."""
        return 1 + ring_left

    @classmethod
    def after(cls, chunk: int, ring_left: int, *, added: int, stopped: bool
              ) -> TokenRing | None:
        """The ring after the result of ``chunk`` (sent with ``ring_left``), which added
        ``added`` tokens (a verdict adds the drafts it kept and one token); None when it is
        over: fewer tokens left than that, or a token was one of its stops (the last
        stage's rule, ``worker.ring.next_step``)."""
        if not ring_left or stopped or ring_left < added:
            return None
        return cls(chunk + 1, ring_left - added)
