"""TLS on the worker port, bound to the cluster token.

Every worker serves TLS with a self-signed certificate it makes on its first start and
keeps in its state folder. There is no certificate authority to ask, and mDNS is
unauthenticated, so a client trusts a worker's certificate only after the worker has
proved, over that very certificate's fingerprint, that it holds the cluster token:

1. the client reads the certificate the port presents (``fetch_certificate``);
2. it opens a gRPC channel that accepts that certificate and no other (pinned);
3. over it, it asks ``Prove`` with a fresh nonce; the worker answers
   HMAC(token, "worker:" + fingerprint + ":" + nonce) (``orchcore.discovery.proof``);
4. only a matching answer lets the token (and any data) go out on that channel.

Someone in between can present a certificate of its own, but cannot answer for it
without the token; relaying the real worker's answer fails, because that one is bound to
the real worker's fingerprint. Plaintext stays possible: on loopback, or by an explicit
setting on both sides (``ORCH_WORKER_PLAINTEXT``, ``ORCH_PLAINTEXT``).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from orchcore.files import write_atomic

log = logging.getLogger(__name__)

SERVER_NAME = "orch-worker"  # every worker's certificate names this; clients pin the key
IDENTITY_FILE = "tls.pem"  # in the worker's state folder: key and certificate, mode 0600
_VALID_DAYS = 100 * 365  # the pin is the trust, not the dates


@dataclass(frozen=True)
class Identity:
    """A worker's TLS key and self-signed certificate, both PEM."""

    key_pem: bytes
    cert_pem: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of a certificate's DER bytes, as hex: what peers pin and proofs cover."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert_pem.decode())).hexdigest()


def short(fp: str) -> str:
    """The fingerprint's first 16 hex digits, grouped, for people to compare."""
    return ":".join(fp[i:i + 4] for i in range(0, 16, 4))


def make_identity() -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return Identity(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
        cert.public_bytes(serialization.Encoding.PEM))


def load_identity(folder: Path) -> Identity:
    """The identity kept in ``folder``, made (and kept, mode 0600) on the first call.

    Key and certificate share one file, written atomically, so workers sharing a folder
    never pair one's key with another's certificate."""
    path = folder / IDENTITY_FILE
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        identity = make_identity()
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (identity.key_pem + identity.cert_pem).decode(), mode=0o600)
        log.info("made this worker's TLS certificate (fingerprint %s) in %s",
                 short(identity.fingerprint), path)
        return load_identity(folder)  # whoever won a race, use what is on disk
    key_end = text.index(b"-----END PRIVATE KEY-----\n") + len(b"-----END PRIVATE KEY-----\n")
    return Identity(text[:key_end], text[key_end:])


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(address: str) -> bool:
    host, _ = host_port(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fetch_certificate(address: str, timeout_s: float) -> bytes | None:
    """The certificate the worker at ``address`` presents (PEM), or None when it answers
    plaintext. Unverified on purpose: the proof over its fingerprint is what trusts it.

    Raises ``OSError`` when nothing accepts the connection."""
    host, port = host_port(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        try:
            with context.wrap_socket(sock, server_hostname=SERVER_NAME) as tls:
                der = tls.getpeercert(binary_form=True)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return None  # a plaintext HTTP/2 server drops a ClientHello
    return ssl.DER_cert_to_PEM_cert(der).encode() if der else None
