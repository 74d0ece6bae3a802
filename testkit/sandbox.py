"""The restrictions of deploy/systemd/orch-worker.service, approximated without systemd:
``bwrap`` gives a read-only root, hidden homes, a private /tmp and /dev and writable state
and cache folders; ``setpriv`` drops to an unprivileged user with no capabilities and no
new privileges; a seccomp program of ours stands for RestrictAddressFamilies= and
SystemCallFilter=.

The seccomp program is classic BPF, as systemd builds it with libseccomp: the system call
architecture must be native; socket() and socketpair() of any family but AF_UNIX, AF_INET,
AF_INET6 and AF_NETLINK fail with EAFNOSUPPORT; every other system call must be in
``@system-service`` minus ``@privileged`` (the groups as this machine's systemd-analyze
lists them). Stricter than the unit on one point: a call outside the list kills the process
(the unit answers EPERM), so a worker that serves here uses nothing the unit denies.
"""

from __future__ import annotations

import functools
import platform
import re
import shutil
import struct
import subprocess
from pathlib import Path

DYNAMIC_UID = 61234  # in the range systemd's DynamicUser= picks from (61184-65519)
ALLOWED_FAMILIES = (1, 2, 10, 16)  # AF_UNIX, AF_INET, AF_INET6, AF_NETLINK
EAFNOSUPPORT = 97

# Classic BPF and seccomp (linux/filter.h, linux/seccomp.h, linux/audit.h).
_LD_ABS_W, _JEQ, _JGE, _JA, _RET = 0x20, 0x15, 0x35, 0x05, 0x06
_ALLOW, _KILL_PROCESS, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (little-endian low word)
_X32_BIT = 0x40000000
_ARCHES = {  # machine: (AUDIT_ARCH_*, the kernel header with the syscall numbers)
    "x86_64": (0xC000003E, "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
}
_SOCKET_CALLS = {"x86_64": (41, 53)}  # socket, socketpair


def _op(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


@functools.cache
def syscall_groups() -> dict[str, list[str]]:
    """``systemd-analyze syscall-filter``: every group and its members (calls or groups)."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                         text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(name: str) -> set[str]:
    groups = syscall_groups()
    if not name.startswith("@"):
        return {name}
    return set().union(*(expand(member) for member in groups[name]))


def syscall_numbers(header: str) -> dict[str, int]:
    text = Path(header).read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)", text)}


def seccomp_program() -> bytes | None:
    """The filter for this machine, or None where we do not know its system calls."""
    machine = platform.machine()
    if machine not in _ARCHES or not Path(_ARCHES[machine][1]).exists() \
            or shutil.which("systemd-analyze") is None:
        return None
    audit_arch, header = _ARCHES[machine]
    numbers = syscall_numbers(header)
    allowed = sorted({numbers[name] for name in expand("@system-service") - expand("@privileged")
                      if name in numbers})
    socket_calls = _SOCKET_CALLS[machine]
    prog = [_op(_LD_ABS_W, _ARCH), _op(_JEQ, audit_arch, 1, 0), _op(_RET, _KILL_PROCESS),
            _op(_LD_ABS_W, _NR), _op(_JGE, _X32_BIT, 0, 1), _op(_RET, _KILL_PROCESS)]
    families_at = len(prog) + 2 * len(socket_calls) + 2 * len(allowed) + 1
    for nr in socket_calls:
        prog += [_op(_JEQ, nr, 0, 1), _op(_JA, families_at - len(prog) - 2)]
    for nr in allowed:
        prog += [_op(_JEQ, nr, 0, 1), _op(_RET, _ALLOW)]
    prog.append(_op(_RET, _KILL_PROCESS))
    assert len(prog) == families_at
    prog.append(_op(_LD_ABS_W, _ARG0))
    for family in ALLOWED_FAMILIES:
        prog += [_op(_JEQ, family, 0, 1), _op(_RET, _ALLOW)]
    prog.append(_op(_RET, _ERRNO | EAFNOSUPPORT))
    return b"".join(prog)


def hidden_homes() -> list[Path]:
    return [p for p in (Path("/home"), Path("/root"), Path("/run/user")) if p.is_dir()]


# Loads the seccomp program from a descriptor, then becomes the command (the process has
# no new privileges already: setpriv saw to it).
_LOADER = """
import ctypes, os, sys
program = os.pread(int(sys.argv[1]), 1 << 20, 0)
buffer = ctypes.create_string_buffer(program, len(program))
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
prog = Prog(len(program) // 8, ctypes.addressof(buffer))
if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "cannot load the seccomp program")
os.execv(sys.argv[2], sys.argv[2:])
"""


def command(args: list[str], state: Path, cache: Path, exposed: list[Path],
            seccomp_fd: int, python: str) -> list[str]:
    """``args`` run as the unit would run them (see the module docstring), by root: bwrap
    builds the file system view, setpriv becomes the unprivileged user, our loader adds the
    seccomp program (from ``seccomp_fd``, passed on by the caller) and runs ``args``.
    ``exposed``: folders under a hidden home that stay visible, read-only: this machine's
    Python lives in /root. On a real host the installer refuses an orch under a home."""
    homes = hidden_homes()
    cmd = ["bwrap", "--ro-bind", "/", "/",  # ProtectSystem=strict
           "--dev", "/dev",  # PrivateDevices=yes
           "--proc", "/proc", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
           "--tmpfs", "/tmp", "--tmpfs", "/var/tmp",  # PrivateTmp=yes
           ]
    for home in homes:  # ProtectHome=yes
        cmd += ["--tmpfs", str(home)]
    # What the unit hides (homes, /tmp) but this test run lives in: a checkout or its Python
    # under /root or /tmp stays visible, read-only.
    hidden = [*homes, Path("/tmp"), Path("/var/tmp")]
    for path in dict.fromkeys(exposed):
        home = next((h for h in hidden if path.is_relative_to(h)), None)
        if home is not None:  # its parents readable (bwrap would make them 0700)
            for parent in reversed(path.relative_to(home).parents[:-1]):
                cmd += ["--perms", "0755", "--dir", str(home / parent)]
            cmd += ["--ro-bind", str(path), str(path)]
    # StateDirectory=orch, CacheDirectory=orch; the rest of /var/lib and /var/cache hidden
    # (stricter than the unit, which shows them read-only: bwrap needs the mount points).
    cmd += ["--tmpfs", "/var/lib", "--bind", str(state), "/var/lib/orch",
            "--tmpfs", "/var/cache", "--bind", str(cache), "/var/cache/orch",
            "--die-with-parent", "--new-session", "--",
            # DynamicUser=, CapabilityBoundingSet=, NoNewPrivileges=
            "setpriv", f"--reuid={DYNAMIC_UID}", f"--regid={DYNAMIC_UID}", "--clear-groups",
            "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--",
            python, "-c", _LOADER, str(seccomp_fd)]  # RestrictAddressFamilies=, SystemCallFilter=
    return [*cmd, *args]


def usable() -> str | None:
    """None if this machine can build the sandbox, else why not."""
    for tool in ("setpriv", "bwrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/test-deps.sh installs it)"
    done = subprocess.run(["bwrap", "--ro-bind", "/", "/", "--unshare-pid", "--", "true"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"bwrap cannot make a sandbox here: {done.stderr.strip()}"
    return None
