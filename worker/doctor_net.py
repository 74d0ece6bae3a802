"""``orch doctor``'s network checks: the worker port (free, or held by an orch worker that
proves itself) and multicast discovery seeing its own advert."""

from __future__ import annotations

import errno
import secrets
import socket
import threading
import time
from contextlib import ExitStack

import ifaddr
import psutil
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from orchcore import clustertoken
from orchcore.discovery import interface_addresses
from orchcore.errors import InvalidSettingError, OrchError
from orchcore.wire.channel import Trust, connect
from orchcore.wire.tls import short
from worker.checkup import PROVE_DEADLINE_S, TEST_SERVICE_TYPE, Check, DoctorOptions, Status

# --- the worker port -------------------------------------------------------------------------

def check_port(options: DoctorOptions) -> Check:
    host, port = options.host, options.port
    if port == 0:
        return Check("port", Status.OK, "port 0: the worker takes a free port at start and "
                     "announces it")
    problem = _bind_problem(host, port)
    address = f"{host}:{port}"
    if problem is None:
        if clustertoken.is_loopback(host):
            return Check("port", Status.WARN, f"{address} is free, but it is loopback: "
                         "other machines cannot reach a worker here",
                         f"for a cluster, set ORCH_WORKER_HOST=0.0.0.0 in {options.env.path} "
                         f"(or orch worker --host 0.0.0.0)")
        return Check("port", Status.OK, f"{address} is free")
    if problem.errno != errno.EADDRINUSE:
        return Check("port", Status.FAIL, f"cannot listen on {address}: {problem.strerror}",
                     "set ORCH_WORKER_HOST to an address of this machine (0.0.0.0 for all) "
                     "and ORCH_WORKER_PORT to a port above 1023")
    worker = _orch_worker(host, port, _worker_token(options))
    if worker is not None:
        return Check("port", worker[0], f"{address} is taken by an orch worker "
                     f"({worker[1]})", worker[2])
    return Check("port", Status.FAIL, f"{address} is taken{_holder(port)}, not by an orch "
                 "worker", f"stop that program, or give the worker another port: "
                 f"ORCH_WORKER_PORT=... in {options.env.path} (or --port); discovered "
                 "workers announce their port, --workers lists need it")


def _bind_problem(host: str, port: int) -> OSError | None:
    """Why a listener cannot bind ``host:port``, or None. No SO_REUSEPORT: a gRPC server
    holding the port would let us share it."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host or "0.0.0.0", port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        return OSError(errno.EADDRNOTAVAIL, f"{host}: {exc.strerror}")
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not busy
        try:
            sock.bind(sockaddr)
            sock.listen(1)
        except OSError as exc:
            return exc
    return None


def _worker_token(options: DoctorOptions) -> str | None:
    return (options.env.values or {}).get("ORCH_WORKER_TOKEN") or \
        options.env_tokens.get("ORCH_WORKER_TOKEN")


def _orch_worker(host: str, port: int, token: str | None
                 ) -> tuple[Status, str, str] | None:
    """(status, what, advice) when an orch worker answers Prove (the call that needs no
    token) on the port, else None."""
    target = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    target = f"[{target}]" if ":" in target else target
    try:  # loopback: plaintext is accepted too, TLS is checked like anywhere else
        link = connect(f"{target}:{port}", token, allow_plaintext=True,
                       timeout_s=PROVE_DEADLINE_S)
    except OrchError:
        return None
    link.close()
    who = f"id {link.worker_id[:8]}" + (f", TLS certificate {short(link.fingerprint)}"
                                        if link.fingerprint else ", plaintext")
    if link.trust is Trust.NO_TOKEN:
        return Status.WARN, f"{who}, without a token", \
            "restart it with ORCH_WORKER_TOKEN set: it serves anyone who can reach it"
    if token is None:
        return Status.OK, f"{who}, with a token this check cannot compare", ""
    if link.trust is not Trust.PROVEN:
        return Status.WARN, f"{who}, holding another token than ORCH_WORKER_TOKEN here", \
            "restart the worker (or its service) so that it reads the current token"
    return Status.OK, f"{who}, holding this machine's token: it is running", ""


def _holder(port: int) -> str:
    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and \
                    conn.laddr.port == port and conn.pid:
                return f" by {psutil.Process(conn.pid).name()} (pid {conn.pid})"
    except (psutil.Error, OSError):
        pass  # other users' sockets are not ours to see
    return ""


# --- multicast -----------------------------------------------------------------------------

def check_multicast(options: DoctorOptions) -> Check:
    if options.discovery == "off":
        return Check("multicast", Status.WARN, "not checked: discovery is off "
                     "(ORCH_WORKER_DISCOVERY=off)", "orchestrators find this worker only "
                     "when listed: orch run --workers HOST:PORT")
    try:
        addresses = interface_addresses(options.discovery)
    except InvalidSettingError as exc:
        return Check("multicast", Status.FAIL, str(exc),
                     "set ORCH_WORKER_DISCOVERY to auto or one of the names listed")
    if not addresses:
        return Check("multicast", Status.WARN, "no interface to announce workers on (auto "
                     "skips loopback, containers, bridges and VPN tunnels)",
                     "join the LAN (Ethernet or Wi-Fi), or name an interface with "
                     "ORCH_WORKER_DISCOVERY; without one, list workers: orch run --workers "
                     "HOST:PORT")
    where = f"{_interface_names(addresses)} ({', '.join(addresses)})"
    try:
        seen = _sees_itself(addresses, options.multicast_timeout_s)
    except OSError as exc:
        return Check("multicast", Status.WARN, f"cannot open mDNS sockets on {where}: {exc}",
                     "another program may hold UDP 5353 exclusively, or the interface "
                     "has no multicast; list workers with --workers HOST:PORT meanwhile")
    if seen is None:
        return Check("multicast", Status.WARN, f"a test service announced on {where} was not "
                     f"seen within {options.multicast_timeout_s:.0f} s",
                     "discovery will not find workers: allow multicast (UDP 5353, mDNS) in "
                     "the firewall and on the Wi-Fi (some routers block it: 'client isolation'"
                     ", 'multicast filtering'), or list workers with --workers HOST:PORT")
    return Check("multicast", Status.OK, f"a test service announced on {where} came back in "
                 f"{seen:.1f} s")


def _sees_itself(addresses: list[str], timeout_s: float) -> float | None:
    """Seconds until a second zeroconf instance saw our test service, or None."""
    label = f"doctor-{secrets.token_hex(4)}"
    info = ServiceInfo(TEST_SERVICE_TYPE, f"{label}.{TEST_SERVICE_TYPE}",
                       addresses=[socket.inet_aton(ip) for ip in addresses], port=9,
                       properties={}, server=f"{label}.local.")
    seen = threading.Event()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:
        if name == info.name and state_change is ServiceStateChange.Added:
            seen.set()

    start = time.monotonic()
    with ExitStack() as stack:  # undone in reverse: unregister, stop browsing, close
        announcer = Zeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
        stack.callback(announcer.close)
        listener = Zeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
        stack.callback(listener.close)
        stack.callback(ServiceBrowser(listener, TEST_SERVICE_TYPE, handlers=[on_change]).cancel)
        announcer.register_service(info)
        stack.callback(announcer.unregister_service, info)
        return time.monotonic() - start if seen.wait(timeout_s) else None


def _interface_names(addresses: list[str]) -> str:
    names = sorted({a.nice_name for a in ifaddr.get_adapters()
                    for ip in a.ips if ip.ip in addresses})
    return ", ".join(names) or "?"


