"""The worker under its unit's restrictions (testkit/sandbox.py: an unprivileged user without
capabilities or new privileges, a read-only root, hidden homes, private /tmp and /dev, the
unit's address families and system calls): it notifies, advertises itself on loopback with
zeroconf, serves Info, loads a shard and computes. What only a host booted with systemd
can show (DynamicUser=, MemoryMax=, the Protect*= of /proc and the kernel, restarts) is
listed in docs/services.md."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from orchcore import modelgen
from orchestrator.cluster.client import WorkerClient
from orchestrator.cluster.discover import discover
from orchestrator.settings import OrchSettings
from testkit import sandbox
from testkit.cluster import GREEDY, greedy_tokens, open_model
from testkit.notifysock import NotifySocket
from worker.install import orch_executable

TOKEN = "a-cluster-token-for-the-sandbox-test"
REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox drops from root to "
                                "an unprivileged user, as systemd does")

PROBE = """
import errno, os, socket
def fails(f, code):
    try:
        f()
    except OSError as exc:
        return exc.errno == code
    return False
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print("uid", os.getuid())
print("nonewprivs", status["NoNewPrivs"].strip(), "capbnd", status["CapBnd"].strip(),
      "capeff", status["CapEff"].strip())
print("packet refused", fails(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW),
                              errno.EAFNOSUPPORT))
print("bluetooth refused", fails(lambda: socket.socket(31, socket.SOCK_STREAM),
                                 errno.EAFNOSUPPORT))
for family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, socket.AF_NETLINK):
    socket.socket(family, socket.SOCK_DGRAM).close()
print("inet unix netlink ok")
print("root read-only", fails(lambda: open("/etc/orch-probe", "w"), errno.EROFS))
print("homes", os.listdir("/root"), os.listdir("/home") if os.path.isdir("/home") else [])
print("tmp", sorted(os.listdir("/tmp")))
open("/var/lib/orch/probe", "w").write("x")
open("/var/cache/orch/probe", "w").write("x")
print("state and cache writable")
"""


@pytest.fixture(scope="module")
def seccomp():
    if (why := sandbox.usable()) is not None:
        pytest.skip(why)
    program = sandbox.seccomp_program()
    if program is None:
        pytest.skip("no seccomp program for this architecture (x86_64 only)")
    with tempfile.TemporaryFile() as f:
        f.write(program)
        f.flush()
        f.seek(0)
        yield f.fileno()


@pytest.fixture
def folders():
    """State and cache folders the sandbox user owns (outside pytest's root-only tmp)."""
    top = Path(tempfile.mkdtemp(prefix="orch-sandbox-"))
    state, cache = top / "state", top / "cache"
    for path in (top, state, cache):
        path.mkdir(exist_ok=True)
        os.chown(path, sandbox.DYNAMIC_UID, sandbox.DYNAMIC_UID)
    yield state, cache
    shutil.rmtree(top)


EXPOSED = [Path(sys.base_prefix), Path(sys.prefix), REPO]


def test_the_sandbox_holds_what_the_unit_says(seccomp, folders):
    state, cache = folders
    cmd = sandbox.command([sys.executable, "-c", PROBE], state, cache, EXPOSED, seccomp,
                          sys.executable)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, pass_fds=[seccomp])
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0] == f"uid {sandbox.DYNAMIC_UID}"
    assert out[1] == "nonewprivs 1 capbnd 0000000000000000 capeff 0000000000000000"
    # A private /tmp: nothing but the way to this checkout, when it lives under /tmp.
    ours = sorted({p.relative_to("/tmp").parts[0] for p in EXPOSED
                   if p.is_relative_to("/tmp") and p != Path("/tmp")})
    assert out[2:] == ["packet refused True", "bluetooth refused True",
                       "inet unix netlink ok", "root read-only True",
                       out[6], f"tmp {ours}", "state and cache writable"]
    assert "'.pyenv'" in out[6] or out[6] == "homes [] []"  # only what Python needs
    swapoff = "import ctypes; ctypes.CDLL(None).swapoff(b'/swap')"  # @privileged: killed
    cmd = sandbox.command([sys.executable, "-c", swapoff], state, cache, EXPOSED, seccomp,
                          sys.executable)
    done = subprocess.run(cmd, capture_output=True, timeout=60, pass_fds=[seccomp])
    assert done.returncode == 128 + signal.SIGSYS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_worker_serves_under_the_units_restrictions(seccomp, folders, tmp_path):
    state, cache = folders
    port = _free_port()
    model = modelgen.write_model(tmp_path / "tiny.gguf", modelgen.preset("tiny-llama-gqa"))
    with NotifySocket() as notify:  # abstract: reachable from the sandbox's own mounts
        env = {"PATH": "/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8",  # DynamicUser's
               "ORCH_WORKER_TOKEN": TOKEN, "ORCH_WORKER_HOST": "127.0.0.1",
               "ORCH_WORKER_PORT": str(port), "ORCH_WORKER_MEMORY_BUDGET_MB": "1000",
               "ORCH_WORKER_THREADS": "1", "ORCH_WORKER_DISCOVERY": "lo",
               "ORCH_CACHE_DIR": "/var/cache/orch", "CACHE_DIRECTORY": "/var/cache/orch",
               "STATE_DIRECTORY": "/var/lib/orch", "NOTIFY_SOCKET": notify.env_value,
               "WATCHDOG_USEC": "3000000", "ORCH_WORKER_WATCHDOG_FLOOR_S": "1"}
        cmd = sandbox.command([orch_executable(), "worker"], state, cache, EXPOSED, seccomp,
                              sys.executable)
        proc = subprocess.Popen(cmd, env=env, pass_fds=[seccomp], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            ready = notify.wait_for(lambda f: "READY" in f or "STOPPING" in f, 60)
            assert "READY" in ready.fields, _output(proc)
            address = f"127.0.0.1:{port}"
            client = WorkerClient(address, TOKEN, OrchSettings.load())
            try:
                info = client.info()
            finally:
                client.close()
            assert (state / "worker-id").read_text().strip() == info.worker_id
            found = discover(OrchSettings.load(discovery="lo", discovery_timeout_s=3.0,
                                               token=TOKEN))
            assert address in [w.address for w in found.members]  # zeroconf got through
            with open_model(model, [address], TOKEN, tmp_path / "o") as opened:
                assert len(greedy_tokens(opened, [1, 2, 3], 4)) == 4
                assert opened.new_session(GREEDY)
            assert list((cache / "shards").iterdir())  # the shard landed in the cache
            pings = [m for m in notify.collect(1.5) if m.fields == {"WATCHDOG": "1"}]
            assert pings, notify.messages
            for child in psutil.Process(proc.pid).children(recursive=True):
                if "worker" in " ".join(child.cmdline()):
                    child.send_signal(signal.SIGTERM)
            notify.wait_for(lambda f: f.get("STOPPING") == "1", 15)
            assert proc.wait(15) == 0, _output(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _output(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.kill()
    return f"exit {proc.wait(10)}: {proc.stdout.read()[-3000:]}"
