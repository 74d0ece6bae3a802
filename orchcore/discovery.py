"""What workers and orchestrators agree on to find each other with zeroconf (mDNS/DNS-SD).

The service type, the TXT record (``Advert``: never the token), which interfaces to use,
and the membership proof: a worker proves it holds the cluster token with an HMAC of the
client's nonce and its TLS certificate's fingerprint before the token is sent anywhere
(``orchcore.wire.tls``), so a spoofed advertiser learns nothing.

Discovery settings (``ORCH_DISCOVERY`` and ``ORCH_WORKER_DISCOVERY``): ``auto`` (every
IPv4 interface but loopback, containers and bridges), ``off``, or an interface name
(``eth0``, ``wlan0``, ``lo``, a test namespace's veth).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import ifaddr

from orchcore.errors import InvalidSettingError

SERVICE_TYPE = "_orch-worker._tcp.local."
# Interfaces automatic discovery never uses: loopback, containers, bridges, VPN tunnels.
SKIPPED_PREFIXES = ("lo", "docker", "veth", "virbr", "br-", "cni", "flannel", "podman",
                    "tun", "tap", "wg", "zt")


@dataclass(frozen=True)
class Advert:
    """A worker's TXT record."""

    worker_id: str
    protocol: int
    arch: str
    cores: int
    budget_mb: int
    port: int
    # The TLS certificate's fingerprint (hex), empty for plaintext. Only a hint for people
    # comparing machines: mDNS is unauthenticated, the proof over it is what counts.
    fingerprint: str = ""

    def to_txt(self) -> dict[str, str]:
        return {"id": self.worker_id, "proto": str(self.protocol), "arch": self.arch,
                "cores": str(self.cores), "budget_mb": str(self.budget_mb),
                "port": str(self.port), "fp": self.fingerprint}

    @classmethod
    def from_txt(cls, txt: dict[bytes, bytes | None]) -> Advert | None:
        """The advert in a TXT record, or None when it is not one of ours."""
        text = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
                for k, v in txt.items()}
        try:
            return cls(worker_id=text["id"], protocol=int(text["proto"]), arch=text["arch"],
                       cores=int(text["cores"]), budget_mb=int(text["budget_mb"]),
                       port=int(text["port"]), fingerprint=text.get("fp", ""))
        except (KeyError, ValueError):
            return None


def interface_addresses(setting: str) -> list[str]:
    """The IPv4 addresses discovery binds to for ``setting`` (``auto`` or an interface)."""
    adapters = {a.nice_name: [ip.ip for ip in a.ips if isinstance(ip.ip, str)]
                for a in ifaddr.get_adapters()}
    if setting == "auto":
        return [ip for name, ips in sorted(adapters.items())
                if not name.startswith(SKIPPED_PREFIXES) for ip in ips]
    if setting not in adapters:
        raise InvalidSettingError(f"discovery interface {setting!r} does not exist; this "
                                  f"machine has {', '.join(sorted(adapters))} (or use auto "
                                  f"or off)")
    if not adapters[setting]:
        raise InvalidSettingError(f"discovery interface {setting!r} has no IPv4 address")
    return adapters[setting]


def proof(token: str, nonce: bytes, role: bytes, fingerprint: str = "") -> bytes:
    """HMAC-SHA256 of ``nonce`` with the cluster token, bound to who answers (``role``) and
    to the TLS certificate it answers over (``fingerprint``, hex; empty for plaintext)."""
    message = role + b":" + fingerprint.encode() + b":" + nonce
    return hmac.new(token.encode(), message, hashlib.sha256).digest()
