"""First boot of a Raspberry Pi made with ``orch image``: from a fresh card to a running
worker, once.

This file runs on the Pi before orch is installed there: cloud-init writes it (from the
image's ``user-data``) to ``/usr/local/lib/orch/firstboot.py`` and starts it as the unit
``orch-firstboot.service`` with the system's ``python3``, so it imports only the standard
library and PyYAML (a dependency of cloud-init). Every path is under ``--root``: the Pi
runs it with ``/``, the tests with a staging folder. Its steps, each done once and safe to
run again after a failure (the unit retries until the last one is done):

1. the cluster token moves from the world-readable FAT boot partition to a root-only file;
2. any Wi-Fi password is removed from the boot partition's ``network-config`` (cloud-init
   has written the system's own network settings by then, and is told to keep them);
3. the node names itself ``PREFIX-XXXXXX`` (random: cards flashed from one image never
   share a name; its worker id is made by the worker at its first start, also random);
4. orch is installed into a venv (``/opt/orch``) from the wheels the orchestrator publishes
   on the LAN (``orch publish``), each checked against the sha256 the image pins, and
   llama-cpp-python, if no wheel for this Pi was published, is built from PyPI's sdist
   (cmake's progress goes to the journal: ``journalctl -u orch-firstboot -f``);
5. ``orch worker install --token -`` writes ``/etc/orch/worker.env`` (mode 0600) and the
   unit, and enables and starts the worker, which then announces itself on the LAN.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("orch-firstboot")

TOKEN_FILE = "orch-token"  # on the boot partition, written by `orch image`
CONFIG_FILE = "etc/orch/firstboot.json"  # written by cloud-init from user-data
STATE_DIR = "var/lib/orch-firstboot"  # root-only: the token until installed, markers
VENV = "opt/orch"
NETWORK_CONFIG = "network-config"
KEEP_NETWORK = "etc/cloud/cloud.cfg.d/99-orch-keep-network.cfg"
UNIT = "orch-worker.service"
_CHUNK = 1 << 20
_REMOVED_NOTE = ("# orch: the Wi-Fi password was removed at first boot; the network settings\n"
                 "# cloud-init wrote from this file live in /etc/netplan (root only) and are\n"
                 "# kept (/etc/cloud/cloud.cfg.d/99-orch-keep-network.cfg).\n")


class FirstBootError(Exception):
    """A step failed; the message says what to do. The unit retries later."""


@dataclass(frozen=True)
class Config:
    """What the image pins: where the wheels are and what each one hashes to."""
    wheels_url: str
    files: dict[str, str]  # wheel file name -> sha256
    llama_requirement: str  # e.g. llama-cpp-python==0.3.36, what orch-cluster pins
    hostname_prefix: str = "orch"
    token_file: str = TOKEN_FILE

    @classmethod
    def read(cls, path: Path) -> Config:
        return cls.read_text(path.read_text())

    @classmethod
    def read_text(cls, text: str) -> Config:
        data = json.loads(text)
        return cls(wheels_url=data["wheels_url"], llama_requirement=data["llama_requirement"],
                   files={f["name"]: f["sha256"] for f in data["files"]},
                   hostname_prefix=data.get("hostname_prefix", "orch"),
                   token_file=data.get("token_file", TOKEN_FILE))


def live(root: Path) -> bool:
    """Whether ``root`` is this running system (booted with systemd), not a staging folder."""
    return root.resolve() == Path("/") and Path("/run/systemd/system").is_dir()


# --- 1. the token ----------------------------------------------------------------------


def take_token(boot: Path, state: Path, name: str = TOKEN_FILE) -> str:
    """The cluster token, moved from the boot partition into ``state`` (mode 0600)."""
    kept = state / "token"
    on_fat = boot / name
    if on_fat.is_file():
        token = on_fat.read_text().strip()
        _write_private(kept, token + "\n")
        on_fat.unlink()
        log.info("moved the cluster token from %s to %s (mode 0600)", on_fat, kept)
        return token
    if kept.is_file():
        return kept.read_text().strip()
    raise FirstBootError(f"no cluster token: neither {on_fat} nor {kept} exists; put the token "
                         f"in {on_fat} (or run `orch image --boot-dir` again) and reboot")


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- 2. the Wi-Fi password ---------------------------------------------------------------


def scrub_wifi(boot: Path, root: Path) -> int:
    """Remove every Wi-Fi password from the boot partition's network-config, and tell
    cloud-init to keep the network settings it made from it. Returns how many it removed."""
    import yaml  # cloud-init's own dependency, on every system this runs on

    path = boot / NETWORK_CONFIG
    if not path.is_file():
        return 0
    data = yaml.safe_load(path.read_text()) or {}
    network = data.get("network", data) if isinstance(data, dict) else {}
    removed = 0
    for device in (network.get("wifis") or {}).values():
        for access_point in ((device or {}).get("access-points") or {}).values():
            if isinstance(access_point, dict) and "password" in access_point:
                del access_point["password"]
                removed += 1
    if removed:
        keep = root / KEEP_NETWORK
        keep.parent.mkdir(parents=True, exist_ok=True)
        keep.write_text("# orch: network-config on the boot partition has no Wi-Fi password "
                        "any more;\n# keep the settings cloud-init made from it at first "
                        "boot.\nnetwork:\n  config: disabled\n")
        path.write_text(_REMOVED_NOTE + yaml.safe_dump(data, sort_keys=False))
        log.info("removed %d Wi-Fi password(s) from %s", removed, path)
    return removed


# --- 3. the node's name ----------------------------------------------------------------


def name_node(root: Path, state: Path, prefix: str) -> str:
    """A name of this node's own (``PREFIX-XXXXXX``, random), made once and kept."""
    marker = state / "hostname"
    if marker.is_file():
        return marker.read_text().strip()
    name = f"{prefix}-{secrets.token_hex(3)}"
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/hostname").write_text(name + "\n")
    hosts = root / "etc/hosts"
    lines = hosts.read_text().splitlines() if hosts.is_file() else ["127.0.0.1\tlocalhost"]
    lines = [line for line in lines if not line.startswith("127.0.1.1")] + \
        [f"127.0.1.1\t{name}"]
    hosts.write_text("\n".join(lines) + "\n")
    if live(root):
        _run(["hostnamectl", "set-hostname", name], "set the host name")
    _write_private(marker, name + "\n")
    log.info("this node is %s", name)
    return name


# --- 4. orch ---------------------------------------------------------------------------


def fetch_wheels(config: Config, dest: Path) -> list[Path]:
    """Each pinned wheel from the LAN into ``dest``, checked against its sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    got = []
    for name, sha256 in sorted(config.files.items()):
        path = dest / name
        if not (path.is_file() and _sha256(path) == sha256):
            url = urllib.parse.urljoin(config.wheels_url, urllib.parse.quote(name))
            log.info("fetching %s", url)
            _download(url, path, sha256)
        got.append(path)
    return got


def _download(url: str, path: Path, sha256: str) -> None:
    tmp = path.with_name(f".{path.name}.part")
    digest = hashlib.sha256()
    try:
        # an opener of its own: the proxy settings of this moment, nothing installed for
        # the rest of the process (urlopen's shared opener keeps those of its first use)
        with urllib.request.build_opener().open(url, timeout=60) as answer, \
                tmp.open("wb") as out:
            while chunk := answer.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise FirstBootError(f"cannot fetch {url} ({getattr(exc, 'reason', exc)}): run "
                             f"`orch publish` on the orchestrator (this unit tries again "
                             f"every minute)") from None
    if digest.hexdigest() != sha256:
        tmp.unlink()
        raise FirstBootError(f"{url} has sha256 {digest.hexdigest()}, not {sha256} as this "
                             f"image pins: it is not the wheel the image was made for; publish "
                             f"the same wheels again, or make the image again with `orch "
                             f"image`")
    os.replace(tmp, path)


def install_orch(root: Path, state: Path, config: Config) -> str:
    """orch in a venv at ``root/opt/orch``; returns its ``orch`` command."""
    venv = root / VENV
    python = venv / "bin" / "python"
    if not python.exists():
        log.info("making the venv %s", venv)
        _run([sys.executable, "-m", "venv", str(venv)], "make the venv")
    wheels = fetch_wheels(config, state / "wheels")
    ours = [w for w in wheels if w.name.startswith("orch_cluster-")]
    if len(ours) != 1:
        raise FirstBootError(f"the image pins {len(ours)} orch_cluster wheels, not 1: make "
                             f"the image again with `orch image` while `orch publish` runs")
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "off",
           "--disable-pip-version-check", "--find-links", str(state / "wheels")]
    log.info("installing %s: a published wheel if one fits this Pi, else built from PyPI's "
             "sdist (the build takes 20-90 min on a Pi, an estimate; cmake's progress "
             "follows)", config.llama_requirement)
    _run([*pip, "--verbose", config.llama_requirement], "install llama-cpp-python")
    log.info("installing orch and its other dependencies")
    _run([*pip, str(ours[0])], "install orch")
    return str(venv / "bin" / "orch")


# --- 5. the worker -----------------------------------------------------------------------


def install_worker(orch: str, root: Path, token: str) -> None:
    """``orch worker install --token -``: the env file, the unit, enabled (started when
    ``root`` is this running system)."""
    _run([orch, "worker", "install", "--token", "-", "--root", str(root)],
         "install the worker service", stdin=token + "\n")
    if not live(root):  # a staging root: enable the unit the way systemctl does offline
        _run(["systemctl", f"--root={root}", "enable", UNIT], "enable the worker unit")


def first_boot(root: Path, boot: Path, config: Config, orch: str | None = None) -> str:
    """All steps; returns the node's name. ``orch``: use this installed orch command
    instead of installing one (a staging root's test)."""
    state = root / STATE_DIR
    if (state / "done").is_file():
        name = (state / "done").read_text().strip()
        log.info("already done: this node is %s", name)
        return name
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = take_token(boot, state, config.token_file)
    scrub_wifi(boot, root)
    name = name_node(root, state, config.hostname_prefix)
    command = orch or install_orch(root, state, config)
    install_worker(command, root, token)
    (state / "token").unlink(missing_ok=True)
    shutil.rmtree(state / "wheels", ignore_errors=True)
    (state / "done").write_text(name + "\n")
    log.info("done: %s runs the orch worker; `orch cluster` on the orchestrator lists it", name)
    return name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _run(command: list[str], what: str, stdin: str | None = None) -> None:
    """Run ``command`` with its output going to ours (the journal)."""
    try:
        done = subprocess.run(command, input=stdin, text=True, check=False)
    except OSError as exc:
        raise FirstBootError(f"cannot {what}: {command[0]}: {exc.strerror}") from None
    if done.returncode != 0:
        raise FirstBootError(f"cannot {what}: `{' '.join(_redact(command))}` exited with "
                             f"{done.returncode} (its output is above)")


def _redact(command: list[str]) -> list[str]:
    return [re.sub(r"(?<=://)[^/@]*@", "***@", part) for part in command]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="the system to set up (default /; a folder to stage one)")
    parser.add_argument("--boot", type=Path, default=Path("/boot/firmware"),
                        help="where the FAT boot partition is mounted")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"the pinned wheels (default ROOT/{CONFIG_FILE})")
    parser.add_argument("--orch", default=None,
                        help="an installed orch command to use instead of installing orch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="orch-firstboot: %(message)s",
                        stream=sys.stdout)
    try:
        config = Config.read(args.config or args.root / CONFIG_FILE)
        first_boot(args.root, args.boot, config, args.orch)
    except FirstBootError as exc:
        log.error("%s", exc)
        return 1
    except (OSError, ValueError, KeyError) as exc:
        log.error("first boot failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
