"""The cloud-init files that make a Raspberry Pi an orch worker at its first boot, as text.

Pure: values in, file contents out (``orchestrator/pi/image.py`` writes them into an image's
boot partition or a card's boot folder). Raspberry Pi OS (Trixie and later) and Ubuntu for
Raspberry Pi read ``user-data``, ``network-config`` and ``meta-data`` from the FAT boot
partition (cloud-init's NoCloud source). The cluster token goes into a file of its own,
``orch-token``, which first boot moves to a root-only place and deletes, so cloud-init's
own copies of user-data never hold it.

Nothing here names one node: every card flashed from one image makes its own host name and
worker id at first boot (``worker/firstboot.py``; the worker makes its id at its first
start). ``meta-data`` has no ``local-hostname``, and user-data keeps cloud-init from
renaming the node afterwards.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import NamedTuple

import yaml

from orchcore import clustertoken
from orchcore.errors import ImageError

USER_DATA, NETWORK_CONFIG, META_DATA = "user-data", "network-config", "meta-data"
TOKEN_FILE = "orch-token"  # on the boot partition until first boot moves it
BOOT_MOUNT = "/boot/firmware"  # where both systems mount the boot partition
FIRSTBOOT_SCRIPT = "/usr/local/lib/orch/firstboot.py"
FIRSTBOOT_CONFIG = "/etc/orch/firstboot.json"
FIRSTBOOT_UNIT = "orch-firstboot.service"
RENDERERS = ("NetworkManager", "networkd")  # Raspberry Pi OS, Ubuntu Server for Pi
_PREFIX = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,48}[a-z0-9])?")
_COUNTRY = re.compile(r"[A-Z]{2}")
# Who can read the token on the card, and for how long: FAT has no file modes.
TOKEN_NOTE = (f"the cluster token is in {TOKEN_FILE} on the FAT boot partition, which has no "
              f"file modes: anyone holding the card (or the image file) can read it, and on the "
              f"Pi any local user until first boot, which moves it to a root-only file and "
              f"deletes it from the card before installing orch")
# Only needed when no llama-cpp-python wheel for the Pi was published: building it from
# PyPI's sdist needs a compiler, cmake and Python's headers.
BUILD_PACKAGES = ("python3-dev", "build-essential", "cmake")


class PinnedWheel(NamedTuple):
    name: str  # the wheel's file name
    sha256: str
    size: int


@dataclass(frozen=True)
class Wifi:
    ssid: str
    password: str
    country: str  # ISO 3166 code: the Pi keeps its radio off until it knows it

    def __post_init__(self) -> None:
        if not 1 <= len(self.ssid.encode()) <= 32:
            raise ImageError(f"Wi-Fi network name {self.ssid!r}: 1 to 32 bytes")
        if not 8 <= len(self.password) <= 63:
            raise ImageError("the Wi-Fi password file must hold a WPA passphrase of 8 to 63 "
                             "characters (one line)")
        if not _COUNTRY.fullmatch(self.country):
            raise ImageError(f"--wifi-country {self.country!r}: the two capital letters of "
                             f"your country (GB, US, DE, FR...); the Pi keeps Wi-Fi off until "
                             f"it knows where it is")


@dataclass(frozen=True)
class NodeSeed:
    """Everything one image says to the nodes flashed from it."""
    wheels_url: str  # where `orch publish` serves the wheels, ending in /
    wheels: tuple[PinnedWheel, ...]
    llama_requirement: str  # orch-cluster's pin, e.g. llama-cpp-python==0.3.36
    firstboot_source: str  # worker/firstboot.py, run by the node's system python3
    ssh_keys: tuple[str, ...] = ()
    wifi: Wifi | None = None
    hostname_prefix: str = "orch"
    renderer: str = "NetworkManager"

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.hostname_prefix):
            raise ImageError(f"--hostname-prefix {self.hostname_prefix!r}: lowercase letters, "
                             f"digits and '-', at most 50 (nodes are named PREFIX-xxxxxx)")
        if self.renderer not in RENDERERS:
            raise ImageError(f"--network-renderer {self.renderer!r}: one of "
                             f"{', '.join(RENDERERS)}")
        if not any(w.name.startswith("orch_cluster-") for w in self.wheels):
            raise ImageError(f"{self.wheels_url} publishes no orch_cluster wheel: start "
                             f"`orch publish` from an orch checkout")

    @property
    def has_llama_wheel(self) -> bool:
        return any(w.name.startswith("llama_cpp_python-") for w in self.wheels)


def check_token(token: str, source: str) -> str:
    """``token`` held to the cluster token's rule for a worker on the LAN (a node's worker
    listens on 0.0.0.0): a short one is refused, not warned about."""
    clustertoken.require(token, loopback=False, source=source)
    return token


def boot_files(seed: NodeSeed, token: str) -> dict[str, str]:
    """The files to write at the top of the boot partition, by name."""
    return {USER_DATA: render_user_data(seed), NETWORK_CONFIG: render_network_config(seed),
            META_DATA: render_meta_data(seed), TOKEN_FILE: check_token(token, "token") + "\n"}


def render_meta_data(seed: NodeSeed) -> str:
    # The same id on every card of an image is right: each card's cloud-init runs it once.
    # It changes with the configuration, so a card given new files runs them again.
    digest = hashlib.sha256((render_user_data(seed) + render_network_config(seed)).encode())
    return ("# Written by `orch image`. No local-hostname: each node names itself at first "
            "boot.\n" + _dump({"instance-id": f"orch-node-{digest.hexdigest()[:12]}"}))


def render_network_config(seed: NodeSeed) -> str:
    """Netplan version 2: wired DHCP, and Wi-Fi when given."""
    network: dict[str, object] = {
        "version": 2, "renderer": seed.renderer,
        "ethernets": {"eth0": {"dhcp4": True, "optional": True}}}
    if seed.wifi is not None:
        network["wifis"] = {"wlan0": {
            "dhcp4": True, "optional": True, "regulatory-domain": seed.wifi.country,
            "access-points": {seed.wifi.ssid: {"password": seed.wifi.password}}}}
    note = ("# Written by `orch image`. The Wi-Fi password is removed from this file at "
            "first boot.\n" if seed.wifi is not None else "# Written by `orch image`.\n")
    return note + _dump({"network": network})


def firstboot_config(seed: NodeSeed) -> str:
    """What ``worker/firstboot.py`` reads: the wheels and their pinned sha256."""
    return json.dumps({
        "wheels_url": seed.wheels_url, "llama_requirement": seed.llama_requirement,
        "hostname_prefix": seed.hostname_prefix, "token_file": TOKEN_FILE,
        "files": [{"name": w.name, "sha256": w.sha256, "size": w.size} for w in seed.wheels],
    }, indent=2) + "\n"


def render_firstboot_unit() -> str:
    return f"""\
# orch first boot (written by cloud-init from the user-data of `orch image`): installs orch
# and its worker service once. Retried every minute until it has succeeded (say, until
# `orch publish` answers); follow it with journalctl -u {FIRSTBOOT_UNIT} -f.
[Unit]
Description=orch first boot: install orch and start its worker
Wants=network-online.target
After=network-online.target
ConditionPathExists=!/var/lib/orch-firstboot/done

[Service]
Type=oneshot
Environment=PYTHONUNBUFFERED=1
ExecStart=/usr/bin/python3 {FIRSTBOOT_SCRIPT} --root / --boot {BOOT_MOUNT} \\
    --config {FIRSTBOOT_CONFIG}
# Building llama.cpp on a Pi can take an hour.
TimeoutStartSec=infinity
Restart=on-failure
RestartSec=60

[Install]
WantedBy=multi-user.target
"""


def render_user_data(seed: NodeSeed) -> str:
    user: dict[str, object] = {
        "name": "orch", "gecos": "orch cluster node", "groups": ["sudo"],
        "shell": "/bin/bash", "lock_passwd": True, "sudo": "ALL=(ALL) NOPASSWD:ALL"}
    if seed.ssh_keys:
        user["ssh_authorized_keys"] = list(seed.ssh_keys)
    packages = ["python3-venv"] + ([] if seed.has_llama_wheel else list(BUILD_PACKAGES))
    runcmd = [["systemctl", "daemon-reload"],
              # --no-block: cloud-init's last stage must not wait for an hour-long build.
              ["systemctl", "enable", "--now", "--no-block", FIRSTBOOT_UNIT]]
    if seed.ssh_keys:
        runcmd.insert(0, ["systemctl", "enable", "--now", "ssh"])
    config = {
        # The node names itself (orch-xxxxxx) at first boot; cloud-init leaves it so.
        "preserve_hostname": True,
        "users": [user],
        "ssh_pwauth": False,
        # A Pi has no clock battery: until NTP has run, apt must not refuse the lists.
        "apt": {"conf": 'Acquire { Check-Date "false"; };\n'},
        "package_update": True,
        "packages": packages,
        "write_files": [
            {"path": FIRSTBOOT_SCRIPT, "permissions": "0755", "content": seed.firstboot_source},
            {"path": FIRSTBOOT_CONFIG, "permissions": "0644", "content": firstboot_config(seed)},
            {"path": f"/etc/systemd/system/{FIRSTBOOT_UNIT}", "permissions": "0644",
             "content": render_firstboot_unit()},
        ],
        "runcmd": runcmd,
    }
    header = (
        "#cloud-config\n"
        "# Written by `orch image` (docs/raspberry-pi.md): the first boot of an orch worker.\n"
        "# cloud-init creates the user `orch` (login with your SSH key only), installs\n"
        f"# the packages below and starts {FIRSTBOOT_UNIT}, which installs orch from\n"
        f"# {seed.wheels_url} (each wheel's sha256 pinned in {FIRSTBOOT_CONFIG}),\n"
        "# names the node, and installs and starts the worker service with the cluster token.\n")
    return header + _dump(config)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so a script or unit reads as itself."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(data: object) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=100)
