"""Separate network hosts on one machine: network namespaces joined by a bridge.

Each host is a namespace with one veth link to a bridge that lives in a namespace of its
own; addresses are in 10.231.7.0/24. Nothing here touches the machine's own interfaces,
and everything is removed on exit. Needs root (``ip netns``); links can be limited to a
rate with ``tc`` (netem where the kernel has it, else a token bucket).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

SUBNET = "10.231.7"
PREFIX = "orchtest"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def netns_available() -> str | None:
    """None when namespaces can be made here, else the reason."""
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = sh("ip", "netns", "add", f"{PREFIX}-probe", check=False)
    if probe.returncode:
        return f"cannot create network namespaces: {probe.stderr.strip()}"
    sh("ip", "netns", "del", f"{PREFIX}-probe", check=False)
    return None


def ns_exec(host: str) -> list[str]:
    """Prefix that runs a command inside ``host``'s namespace."""
    return ["ip", "netns", "exec", f"{PREFIX}-{host}"]


@dataclass
class Network:
    addresses: dict[str, str]  # host -> IPv4 address
    shaping: str = "none"  # how links are limited, for reports


@contextmanager
def network(hosts: Sequence[str], rate: str | None = None, delay: str = "0ms"
            ) -> Iterator[Network]:
    """Build the hosts; ``rate`` (e.g. "4mbit") limits every link."""
    addresses = {h: f"{SUBNET}.{10 + i}" for i, h in enumerate(hosts)}
    names = [f"{PREFIX}-{h}" for h in (*hosts, "br")]
    _remove(names)
    net = Network(addresses)
    try:
        br = f"{PREFIX}-br"
        sh("ip", "netns", "add", br)
        sh("ip", "netns", "exec", br, "ip", "link", "add", "br0", "type", "bridge")
        sh("ip", "netns", "exec", br, "ip", "link", "set", "br0", "up")
        for i, host in enumerate(hosts):
            ns, outer, inner = f"{PREFIX}-{host}", f"ob{i}", f"oh{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", outer, "netns", br)
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "netns", "exec", br, "ip", "link", "set", outer, "master", "br0")
            sh("ip", "netns", "exec", br, "ip", "link", "set", outer, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addresses[host]}/24", "dev",
               inner)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            if rate:
                net.shaping = _shape(ns, inner, rate, delay)
        yield net
    finally:
        _remove(names)


def _shape(ns: str, dev: str, rate: str, delay: str) -> str:
    netem = sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem",
               "rate", rate, "delay", delay, check=False)
    if netem.returncode == 0:
        return f"netem {rate} + {delay}"
    sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
       "burst", "32kbit", "latency", "400ms")
    return f"tbf {rate}, no added delay (no netem in this kernel)"


def _remove(names: Sequence[str]) -> None:
    for name in names:
        sh("ip", "netns", "del", name, check=False)
