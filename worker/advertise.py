"""The worker's zeroconf advert: its service, found by orchestrators on the LAN.

The service name is made from the worker id. A clone of another machine's SD card starts
with that machine's id; registering then meets the other's name on the network
(zeroconf's probe), and the worker makes itself a new id and registers again.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable

from zeroconf import IPVersion, NonUniqueNameException, ServiceInfo, Zeroconf

from orchcore.discovery import SERVICE_TYPE, Advert, interface_addresses

log = logging.getLogger(__name__)

CLASH_CHECK_MS = 1500  # how long to ask whether our name is taken before announcing it


def advertised_addresses(setting: str, host: str) -> list[str]:
    """The addresses to announce: those of the discovery interfaces the worker listens on."""
    if setting == "off":
        return []
    ips = interface_addresses(setting)
    if host in ("0.0.0.0", "", "::"):
        return ips
    return [ip for ip in ips if ip == host]


class Advertiser:
    def __init__(self, addresses: list[str], advert: Callable[[], Advert],
                 new_id: Callable[[], str]) -> None:
        self.addresses = addresses
        self._advert = advert
        self._new_id = new_id
        self._zc: Zeroconf | None = None

    def start(self) -> None:
        if not self.addresses:
            return
        self._zc = Zeroconf(interfaces=self.addresses, ip_version=IPVersion.V4Only)
        info = self._info()
        if self._taken(info):
            old = self._advert().worker_id
            new = self._new_id()
            log.warning("worker id %s is already on the network (a cloned machine?); this "
                        "worker is now %s", old[:8], new[:8])
            info = self._info()
        try:
            self._zc.register_service(info)
        except NonUniqueNameException:  # lost a race with a clone starting at the same time
            self._new_id()
            self._zc.register_service(self._info())
        log.info("advertised as %s on %s", self._advert().worker_id[:8],
                 ", ".join(self.addresses))

    def _taken(self, info: ServiceInfo) -> bool:
        """Whether another worker already answers to our service name."""
        other = self._zc.get_service_info(SERVICE_TYPE, info.name, timeout=CLASH_CHECK_MS)
        return other is not None and (other.port, set(other.addresses)) != (
            info.port, set(info.addresses))

    def _info(self) -> ServiceInfo:
        advert = self._advert()
        label = f"orch-{advert.worker_id[:16]}"
        return ServiceInfo(SERVICE_TYPE, f"{label}.{SERVICE_TYPE}",
                           addresses=[socket.inet_aton(ip) for ip in self.addresses
                                      if ipaddress.ip_address(ip).version == 4],
                           port=advert.port, properties=advert.to_txt(),
                           server=f"{label}.local.")

    def close(self) -> None:
        if self._zc is not None:
            self._zc.unregister_all_services()
            self._zc.close()
            self._zc = None
