"""What the planner knows about one worker's machine: ``DeviceFacts``, a pure value.

Made once from what a worker reports (``orchcore.control.WorkerReport.device``).
Workers that report the same ``host_id`` run on one machine and share its RAM.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceFacts:
    address: str  # host:port the orchestrator reaches the worker at
    worker_id: str  # stable per worker install
    host_id: str  # same for every worker on one running machine
    hostname: str
    arch: str
    cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    memory_budget_bytes: int  # the most the worker's whole process may use
    decode_s_per_layer: float | None = None  # measured for the model at hand; None = unknown
    prefill_s_per_layer: float | None = None  # per prompt token, measured likewise
    link_s: float | None = None  # measured round trip to this worker; None = unknown
    bandwidth_bytes_s: float | None = None  # measured from the orchestrator; None = unknown
    threads: int = 0  # llama.cpp threads the worker runs with (its --threads); 0 = cores
    # What the worker's process holds with nothing loaded, measured; None or 0 = unknown
    # (the estimate then assumes ``orchcore.memory.PROCESS_BASELINE_BYTES``).
    baseline_bytes: int | None = None

    @property
    def label(self) -> str:
        return f"{self.address} ({self.hostname})" if self.hostname else self.address
