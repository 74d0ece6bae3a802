"""Finding workers on the LAN: browse zeroconf briefly, then keep only the workers that
prove, over their TLS certificate, that they hold our cluster token
(``orchcore.wire.channel.connect``) before the token is ever sent to them. The others are
listed as belonging to another cluster."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

from orchcore.discovery import SERVICE_TYPE, Advert, interface_addresses
from orchcore.errors import AuthError, OrchError
from orchcore.wire import PROTOCOL_VERSION
from orchcore.wire.channel import Trust, connect
from orchcore.wire.tls import short
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
    try:  # no token is sent: the worker proves it holds ours over its certificate
        link = connect(worker.address, settings.token_value,
                       allow_plaintext=settings.plaintext, timeout_s=settings.probe_deadline_s)
    except AuthError as exc:
        return exc.reason
    except OrchError as exc:
        return f"does not answer ({exc})"
    link.close()
    if worker.advert.fingerprint and link.fingerprint != worker.advert.fingerprint:
        return (f"its certificate ({short(link.fingerprint)}) is not the one it announces "
                f"({short(worker.advert.fingerprint)}): someone may be in between")
    if not settings.token_value:
        return None if link.trust is Trust.NO_TOKEN else \
            "another cluster (it has a token; set ORCH_TOKEN)"
    return {Trust.PROVEN: None,
            Trust.NO_TOKEN: "another cluster (it has no token)",
            Trust.OTHER: "another cluster (a different token)"}[link.trust]
