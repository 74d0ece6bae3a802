"""``orch cluster``: the topology map. What each worker is, holds and runs, and the links
measured from the orchestrator to each worker and between consecutive workers; the workers
that did not answer (or did not prove the cluster token), with the reason."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from orchcore.control import WorkerReport
from orchcore.errors import OrchError, WorkerError
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
    baseline_mb: int = 0  # its process with nothing loaded, measured; 0 = not reported


@dataclass(frozen=True)
class Unreached:
    """A listed worker the map could not show: no answer, or it did not prove our token."""

    address: str
    reason: str


@dataclass(frozen=True)
class ClusterMap:
    workers: tuple[WorkerView, ...]  # those that answered, in the order given
    unreached: tuple[Unreached, ...] = ()


def survey(addresses: Sequence[str], settings: OrchSettings) -> ClusterMap:
    """Ask every worker about itself and measure the links between those that answer, each
    to the next; the others are listed with the reason."""
    clients = [WorkerClient(a, settings.token_value, settings) for a in addresses]
    try:
        reached, unreached = [], []
        for client in clients:
            try:
                reached.append((client, client.info()))  # another version is shown, not fatal
            except OrchError as exc:
                unreached.append(Unreached(client.address, _reason(exc)))
        views = []
        for i, (client, info) in enumerate(reached):
            nxt = reached[i + 1][0].address if i + 1 < len(reached) else None
            if version_problem(info) is not None:
                views.append(_view(client, info, Link(None, None, "not measured"), None))
                continue
            views.append(_view(client, info, _link(client, settings), nxt and _next_link(
                client, nxt, settings)))
        return ClusterMap(tuple(views), tuple(unreached))
    finally:
        for c in clients:
            c.close()


def _reason(exc: OrchError) -> str:
    return exc.reason if isinstance(exc, WorkerError) else str(exc)


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
        problem=version_problem(info), tls=client.link.fingerprint,
        baseline_mb=-(-info.baseline_bytes // mib))


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


def to_json(found: ClusterMap) -> dict:
    return {"workers": [asdict(v) for v in found.workers],
            "unreachable": [asdict(u) for u in found.unreached]}
