"""The cluster token: the one rule every command holds it to, the advice when it falls
short, and how a new one is made.

A token is sent as ``authorization: Bearer TOKEN`` and kept in an env file systemd reads,
so it is one word of the Bearer token's characters (RFC 6750's b64token: letters, digits
and ``-._~+/=``). It guards a worker reachable from the LAN, so it has 16 or more of
them; on loopback (a worker bound to 127.0.0.1 or ::1, which only this machine can
reach) a shorter one is only warned about. ``orch worker``, ``orch worker install``,
``orch rotate-token``, ``orch image`` and ``orch doctor`` all judge a token here, so they
give the same verdict on the same token. Pure.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import secrets
from dataclasses import dataclass

from orchcore.errors import ClusterTokenError

MIN_LENGTH = 16
CHARACTERS = "letters, digits or -._~+/="
_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")
MAKE_ONE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
ADVICE = f"make one with: {MAKE_ONE}"


class Verdict(enum.StrEnum):
    OK = "ok"
    WARN = "warn"  # accepted, with a warning (a short token on loopback)
    REFUSED = "refused"


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    problem: str = ""  # what is wrong, without the advice; empty when OK

    def message(self, source: str) -> str:
        """One line for a user: where the token came from, what is wrong, what to do."""
        return f"{source}: {self.problem}; {ADVICE}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this
    machine's loopback, which no other machine reaches."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def judge(token: str, *, loopback: bool) -> Judgement:
    """The verdict on ``token`` for a worker on loopback or not."""
    if not token:
        return Judgement(Verdict.REFUSED, "the cluster token is empty")
    if not _CHARS.fullmatch(token):
        return Judgement(Verdict.REFUSED, f"the cluster token must be one word of {CHARACTERS} "
                                          f"(no spaces, no ':')")
    if len(token) < MIN_LENGTH:
        where = ("on loopback it is accepted, but not on a LAN" if loopback
                 else "a worker on the LAN refuses it")
        return Judgement(Verdict.WARN if loopback else Verdict.REFUSED,
                         f"the cluster token has {len(token)} characters, fewer than "
                         f"{MIN_LENGTH} ({where})")
    return Judgement(Verdict.OK)


def require(token: str, *, loopback: bool, source: str) -> str | None:
    """``token`` held to the rule: raises ``ClusterTokenError`` when refused; returns the
    warning to show when only warned about, else None."""
    judgement = judge(token, loopback=loopback)
    if judgement.verdict is Verdict.REFUSED:
        raise ClusterTokenError(judgement.message(source))
    return judgement.message(source) if judgement.verdict is Verdict.WARN else None


def generate() -> str:
    """A new random token (43 characters, 256 bits)."""
    return secrets.token_urlsafe(32)
