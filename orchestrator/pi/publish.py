"""``orch publish``: the wheels a new Raspberry Pi installs orch from, served over HTTP on
the LAN, with a list of their sha256 (``orch-wheels.json``) that ``orch image`` pins into
the image.

The folder holds orch's own wheel, built from this checkout (so the nodes run the
orchestrator's exact version), and any extra wheels given, such as an arm64 build of
llama-cpp-python (``bench/arm64/``): a Pi installs a published wheel when one fits it and
builds the rest from PyPI's sdist.
"""

from __future__ import annotations

import functools
import html
import http.server
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from orchcore import clustertoken
from orchcore.discovery import interface_addresses
from orchcore.errors import PublishError
from orchcore.files import sha256_file, write_atomic
from orchestrator.pi.cloudinit import PinnedWheel

log = logging.getLogger(__name__)

DISTRIBUTION = "orch-cluster"
MANIFEST = "orch-wheels.json"
DEFAULT_PORT = 8765


def source_root() -> Path | None:
    """The checkout this orch runs from (an editable install), if it is one."""
    root = Path(__file__).resolve().parents[2]  # orchestrator/pi/publish.py
    return root if (root / "pyproject.toml").is_file() else None


def build_orch_wheel(dest: Path, root: Path | None = None) -> Path:
    """orch's wheel, built with pip from this checkout (or ``root``) into ``dest``: with
    this environment's setuptools when it builds wheels alone (70.1 and later; older ones
    need the ``wheel`` package), else in pip's isolated build environment."""
    root = root or source_root()
    if root is None:
        raise PublishError("this orch is not run from a checkout, so its wheel cannot be "
                           "built here: give the wheel with --orch-wheel FILE (pip wheel "
                           "--no-deps CHECKOUT)")
    for old in dest.glob("orch_cluster-*.whl"):
        old.unlink()
    offline = ["--no-build-isolation"] if builds_wheels_here() else []
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", *offline,
               "--disable-pip-version-check", "--quiet", "-w", str(dest), str(root)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    built = sorted(dest.glob("orch_cluster-*.whl"))
    if done.returncode != 0 or len(built) != 1:
        raise PublishError(f"pip could not build orch's wheel from {root} (exit "
                           f"{done.returncode}): {pip_tail(done.stderr or done.stdout)}; fix "
                           f"that, or give a wheel with --orch-wheel FILE")
    return built[0]


def builds_wheels_here() -> bool:
    """Whether this environment's setuptools builds a wheel without downloading anything."""
    try:
        version = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        return False
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    return numbers >= (70, 1) or importlib.util.find_spec("wheel") is not None


_PIP_NOISE = ("note:", "hint:", "[end of output]", "[notice]", "WARNING: You are using pip")


def pip_tail(output: str, lines: int = 4, limit: int = 500) -> str:
    """The last lines of pip's output that say something, on one line: pip ends with the
    error, after pages of build log and boilerplate notes."""
    kept = [line.strip(" \t│╰─>|") for line in output.splitlines()]
    kept = [line for line in kept if line and not line.startswith(_PIP_NOISE)]
    text = " | ".join(kept[-lines:]) or "no output"
    return text if len(text) <= limit else "..." + text[-limit:]


def llama_requirement() -> str:
    """What orch-cluster requires of llama-cpp-python (its exact pin)."""
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        raise PublishError(f"{DISTRIBUTION} is not installed (pip install -e .)") from None
    for requirement in requires:
        if requirement.replace("_", "-").lower().startswith("llama-cpp-python"):
            return requirement.split(";")[0].replace(" ", "")
    raise PublishError(f"{DISTRIBUTION} does not require llama-cpp-python")


def gather(folder: Path, orch_wheel: Path | None, extra: Iterable[Path]) -> list[PinnedWheel]:
    """Fill ``folder`` with orch's wheel and the extra wheels (files or folders of them),
    and write its manifest and index page. Returns what it lists."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    wheels = [orch_wheel] if orch_wheel is not None else []
    for item in extra:
        if item.is_dir():
            found = sorted(item.glob("*.whl"))
            if not found:
                raise PublishError(f"--wheels {item} holds no .whl file")
            wheels += found
        elif item.is_file() and item.suffix == ".whl":
            wheels.append(item)
        else:
            raise PublishError(f"--wheels {item}: give a .whl file or a folder of them")
    for wheel in wheels:
        if wheel.parent.resolve() != folder.resolve():
            shutil.copy2(wheel, folder / wheel.name)
    if orch_wheel is None:
        wheels.append(build_orch_wheel(folder))
    pinned = [PinnedWheel(w.name, sha256_file(folder / w.name), (folder / w.name).stat().st_size)
              for w in sorted({w.name: w for w in wheels}.values(), key=lambda w: w.name)]
    write_atomic(folder / MANIFEST, json.dumps(
        {"files": [w._asdict() for w in pinned]}, indent=2) + "\n")
    rows = "\n".join(f'<li><a href="{html.escape(urllib.parse.quote(w.name))}#sha256='
                     f'{w.sha256}">{html.escape(w.name)}</a></li>' for w in pinned)
    write_atomic(folder / "index.html", f"<!doctype html><title>orch wheels</title><ul>\n"
                                        f"{rows}\n</ul>\n")
    return pinned


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def parse_request(self) -> bool:
        """Also the absolute form of a request target (``GET http://host:port/path``), which
        HTTP/1.1 servers must accept (RFC 9112, 3.2.2) and a client sends through a proxy."""
        if not super().parse_request():
            return False
        if self.path.lower().startswith(("http://", "https://")):
            target = urllib.parse.urlsplit(self.path)
            self.path = (target.path or "/") + (f"?{target.query}" if target.query else "")
        return True


def make_server(folder: Path, host: str, port: int) -> http.server.ThreadingHTTPServer:
    """An HTTP server of ``folder`` (read-only), bound but not yet serving."""
    handler = functools.partial(_Quiet, directory=str(folder))
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise PublishError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another "
                           f"--port, or stop what uses it") from None


def lan_address() -> str | None:
    """This machine's first LAN address (what zeroconf's ``auto`` announces on: never
    loopback, containers or bridges), or None without one."""
    found = interface_addresses("auto")
    return found[0] if found else None


def lan_url(port: int = DEFAULT_PORT) -> str | None:
    """``orch publish``'s URL as a Pi on the LAN would use it, or None without a LAN."""
    address = lan_address()
    return f"http://{address}:{port}/" if address else None


def wheels_url(given: str | None) -> str:
    """The wheels URL a node will fetch from: ``given`` (ending in /), else this machine's
    LAN address on the default port. A loopback URL is refused: on a Pi it names the Pi."""
    if given is None:
        url = lan_url()
        if url is None:
            raise PublishError("this machine has no LAN address for the Pis to fetch the "
                               "wheels from: join the LAN, or give --wheels-url http://"
                               "ADDRESS:PORT/ where `orch publish` runs")
        return url
    url = given if given.endswith("/") else given + "/"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PublishError(f"--wheels-url {given}: give http://ADDRESS:PORT/ where `orch "
                           f"publish` runs")
    if clustertoken.is_loopback(parts.hostname):
        port = parts.port or DEFAULT_PORT
        instead = lan_url(port)
        raise PublishError(f"--wheels-url {given} is loopback: a Pi reaches itself there, "
                           f"not this machine; " + (
                               f"give this machine's LAN address: --wheels-url {instead} "
                               f"(and run orch publish --host 0.0.0.0)" if instead else
                               "this machine has no LAN address: join the LAN first"))
    return url


def fetch_manifest(url: str) -> tuple[PinnedWheel, ...]:
    """The wheels ``orch publish`` serves at ``url``, with their sha256."""
    base = url if url.endswith("/") else url + "/"
    try:
        with urllib.request.build_opener().open(base + MANIFEST, timeout=10) as answer:
            data = json.loads(answer.read())
        return tuple(PinnedWheel(f["name"], f["sha256"], int(f["size"])) for f in data["files"])
    except (urllib.error.URLError, OSError) as exc:
        raise PublishError(f"no wheels at {base} ({getattr(exc, 'reason', exc)}): start `orch "
                           f"publish` on this machine first (another terminal), or give "
                           f"--wheels-url where it runs") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise PublishError(f"{base}{MANIFEST} is not a list of wheels ({exc}): is `orch "
                           f"publish` what answers there?") from None

