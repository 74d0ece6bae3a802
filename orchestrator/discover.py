"""Finding workers on the LAN: browse zeroconf briefly, then keep only the workers that
prove they hold our cluster token (``orchcore.discovery.proof``) before the token is ever
sent to them. The others are listed as belonging to another cluster."""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

from orchcore.discovery import SERVICE_TYPE, Advert, interface_addresses, proof
from orchcore.errors import OrchError
from orchcore.wire import PROTOCOL_VERSION
from orchestrator.client import WorkerClient
from orchestrator.settings import OrchSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Found:
    address: str  # host:port
    advert: Advert


@dataclass(frozen=True)
class Discovery:
    members: tuple[Found, ...]  # proved they hold our token, in a stable order
    others: tuple[tuple[Found, str], ...]  # (worker, why it is not used)


def browse(setting: str, timeout_s: float) -> list[Found]:
    """Every orch worker advertised on the discovery interfaces within ``timeout_s``."""
    if setting == "off":
        return []
    zc = Zeroconf(interfaces=interface_addresses(setting), ip_version=IPVersion.V4Only)
    names: set[str] = set()
    lock = threading.Lock()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            with lock:
                names.add(name)

    browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
    try:
        time.sleep(timeout_s)
        found: dict[str, Found] = {}
        with lock:
            todo = sorted(names)
        for name in todo:
            info = zc.get_service_info(SERVICE_TYPE, name, timeout=int(timeout_s * 1000))
            advert = Advert.from_txt(info.properties) if info else None
            if info is None or advert is None:
                continue
            for raw in info.addresses:
                address = f"{socket.inet_ntoa(raw)}:{info.port}"
                found.setdefault(advert.worker_id, Found(address, advert))
                break
        return sorted(found.values(), key=lambda f: (f.advert.worker_id, f.address))
    finally:
        browser.cancel()
        zc.close()


def discover(settings: OrchSettings) -> Discovery:
    members, others = [], []
    for worker in browse(settings.discovery, settings.discovery_timeout_s):
        why = _why_not_member(worker, settings)
        if why is None:
            members.append(worker)
        else:
            others.append((worker, why))
    return Discovery(tuple(members), tuple(others))


def _why_not_member(worker: Found, settings: OrchSettings) -> str | None:
    if worker.advert.protocol != PROTOCOL_VERSION:
        return (f"speaks protocol {worker.advert.protocol}, this orchestrator "
                f"{PROTOCOL_VERSION}")
    token = settings.token_value
    client = WorkerClient(worker.address, None, settings)  # no token until it proves itself
    try:
        nonce = secrets.token_bytes(32)
        reply = client.prove(nonce, settings.probe_deadline_s)
    except OrchError as exc:
        return f"does not answer ({exc})"
    finally:
        client.close()
    if not token:
        return None if not reply.proof else "another cluster (it has a token; set ORCH_TOKEN)"
    if not reply.proof:
        return "another cluster (it has no token)"
    if not hmac.compare_digest(reply.proof, proof(token, nonce, b"worker")):
        return "another cluster (a different token)"
    return None
