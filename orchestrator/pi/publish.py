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
import json
import logging
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from orchcore.errors import PublishError
from orchcore.files import sha256_file, write_atomic
from orchestrator.pi.cloudinit import PinnedWheel

log = logging.getLogger(__name__)

DISTRIBUTION = "orch-cluster"
MANIFEST = "orch-wheels.json"
DEFAULT_PORT = 8765


def source_root() -> Path | None:
    """The checkout this orch runs from (an editable install), if it is one."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def build_orch_wheel(dest: Path) -> Path:
    """orch's wheel, built with pip from this checkout into ``dest``."""
    root = source_root()
    if root is None:
        raise PublishError("this orch is not run from a checkout, so its wheel cannot be "
                           "built here: give the wheel with --orch-wheel FILE (pip wheel "
                           "--no-deps CHECKOUT)")
    for old in dest.glob("orch_cluster-*.whl"):
        old.unlink()
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--disable-pip-version-check", "--quiet", "-w", str(dest), str(root)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    built = sorted(dest.glob("orch_cluster-*.whl"))
    if done.returncode != 0 or len(built) != 1:
        raise PublishError(f"pip could not build orch's wheel from {root} (exit "
                           f"{done.returncode}): {done.stderr.strip()[-2000:]}")
    return built[0]


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


def make_server(folder: Path, host: str, port: int) -> http.server.ThreadingHTTPServer:
    """An HTTP server of ``folder`` (read-only), bound but not yet serving."""
    handler = functools.partial(_Quiet, directory=str(folder))
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise PublishError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another "
                           f"--port, or stop what uses it") from None


def lan_address() -> str:
    """This machine's address on the LAN (the one its default route leaves from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def fetch_manifest(url: str) -> tuple[PinnedWheel, ...]:
    """The wheels ``orch publish`` serves at ``url``, with their sha256."""
    base = url if url.endswith("/") else url + "/"
    try:
        with urllib.request.urlopen(base + MANIFEST, timeout=10) as answer:
            data = json.loads(answer.read())
        return tuple(PinnedWheel(f["name"], f["sha256"], int(f["size"])) for f in data["files"])
    except (urllib.error.URLError, OSError) as exc:
        raise PublishError(f"no wheels at {base} ({getattr(exc, 'reason', exc)}): start `orch "
                           f"publish` on this machine first (another terminal), or give "
                           f"--wheels-url where it runs") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise PublishError(f"{base}{MANIFEST} is not a list of wheels ({exc}): is `orch "
                           f"publish` what answers there?") from None

