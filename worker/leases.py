"""Leases: which orchestrators hold a loaded stage, until when."""

from __future__ import annotations

import time

from orchcore.control import Holder

LEASE_S = 30.0  # a lease lapses this long after its orchestrator's last renewal


class Leases:
    """Which orchestrators hold a stage, until when. Not thread-safe: the service locks."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[float, float]] = {}  # holder -> (since, expires)

    def hold(self, holder: str, now: float) -> None:
        since = self._held.get(holder, (time.time(), 0.0))[0]
        self._held[holder] = (since, now + LEASE_S)

    def renew(self, holder: str, now: float) -> bool:
        if self._live(now).get(holder) is None:
            return False
        self.hold(holder, now)
        return True

    def drop(self, holder: str) -> None:
        self._held.pop(holder, None)

    def _live(self, now: float) -> dict[str, tuple[float, float]]:
        self._held = {h: v for h, v in self._held.items() if v[1] > now}
        return self._held

    def others(self, holder: str, now: float) -> list[str]:
        return [h for h in self._live(now) if h != holder]

    def holders(self, now: float) -> list[Holder]:
        return [Holder(h, since, expires - now)
                for h, (since, expires) in sorted(self._live(now).items())]

    def __bool__(self) -> bool:
        return bool(self._held)
