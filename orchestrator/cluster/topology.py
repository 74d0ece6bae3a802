"""``orch cluster``: the topology map. What each worker is, holds and runs, and the links
measured from the orchestrator to each worker and between consecutive workers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from orchcore.control import WorkerReport
from orchcore.errors import OrchError
from orchestrator.cluster.client import WorkerClient, version_problem
from orchestrator.settings import OrchSettings

# CPU features that decide llama.cpp's speed (x86: AVX2/AVX-512/AMX; ARM: dot product,
# fp16, int8 matrix multiply, SVE).
NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "amx_tile", "asimd", "asimddp", "asimdhp",
                 "i8mm", "sve")
PAYLOAD_BYTES = 4 << 20


@dataclass(frozen=True)
class Link:
    rtt_ms: float | None
    bandwidth_mb_s: float | None
    error: str = ""


@dataclass(frozen=True)
class WorkerView:
    address: str
    worker_id: str
    host: str
    arch: str
    cores: int
    cpu: str
    flags: tuple[str, ...]
    ram_total_mb: int
    ram_available_mb: int
    budget_mb: int
    cache_used_mb: int
    cache_free_mb: int
    cache_max_mb: int
    cached_shards: int
    loaded: str  # "model [start, end)" or ""
    holders: int
    link: Link  # from the orchestrator
    next_link: Link | None  # to the next worker in the list
    version: str  # the worker's orch version
    problem: str | None  # another protocol version: what to do
    tls: str = ""  # the proven certificate's fingerprint (hex); "" for plaintext


def survey(addresses: Sequence[str], settings: OrchSettings) -> list[WorkerView]:
    """Ask every worker about itself; measure the links (raises for an unreachable one)."""
    clients = [WorkerClient(a, settings.token_value, settings) for a in addresses]
    try:
        infos = [c.info() for c in clients]  # a node of another version is shown, not fatal
        views = []
        for i, (client, info) in enumerate(zip(clients, infos, strict=True)):
            nxt = addresses[i + 1] if i + 1 < len(addresses) else None
            if version_problem(info) is not None:
                views.append(_view(client, info, Link(None, None, "not measured"), None))
                continue
            views.append(_view(client, info, _link(client, settings), nxt and _next_link(
                client, nxt, settings)))
        return views
    finally:
        for c in clients:
            c.close()


def _view(client: WorkerClient, info: WorkerReport, link: Link, next_link: Link | None
          ) -> WorkerView:
    mib = 1 << 20
    stage = info.loaded
    loaded = "" if stage is None else f"{stage.model or 'a model'} {stage.layers}"
    return WorkerView(
        address=client.address, worker_id=info.worker_id, host=info.hostname, arch=info.arch,
        cores=info.cores, cpu=info.cpu_model,
        flags=tuple(f for f in NOTABLE_FLAGS if f in set(info.cpu_flags)),
        ram_total_mb=info.ram_total_bytes // mib, ram_available_mb=info.ram_available_bytes // mib,
        budget_mb=info.memory_budget_bytes // mib, cache_used_mb=info.cache_used_bytes // mib,
        cache_free_mb=info.cache_free_bytes // mib, cache_max_mb=info.cache_max_bytes // mib,
        cached_shards=len(info.cached_shards), loaded=loaded,
        holders=0 if stage is None else len(stage.holders),
        link=link, next_link=next_link, version=info.software_version,
        problem=version_problem(info), tls=client.link.fingerprint)


def _link(client: WorkerClient, settings: OrchSettings) -> Link:
    try:
        rtt, bandwidth = client.measure_link(PAYLOAD_BYTES, settings.info_deadline_s * 4)
    except OrchError as exc:
        return Link(None, None, str(exc))
    return Link(rtt * 1e3, bandwidth / 1e6)


def _next_link(client: WorkerClient, address: str, settings: OrchSettings) -> Link:
    try:
        got = client.measure_link_to(address, PAYLOAD_BYTES, settings.info_deadline_s * 6)
    except OrchError as exc:
        return Link(None, None, str(exc))
    if got.error:
        return Link(None, None, got.error)
    return Link(got.rtt_s * 1e3, got.bandwidth_bytes_s / 1e6)


def to_json(views: Sequence[WorkerView]) -> list[dict]:
    return [asdict(v) for v in views]
