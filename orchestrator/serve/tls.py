"""HTTPS for orch serve: a certificate and key given as files, or a self-signed one made
once and kept (key mode 0600) in orch's cache, whose fingerprint clients can pin."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchcore.errors import InvalidSettingError
from orchcore.paths import cache_dir
from orchcore.wire.tls import IDENTITY_FILE, fingerprint, load_identity

SELF_SIGNED_DIR = "serve-tls"  # under orch's cache dir


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    fingerprint: str | None  # of a self-signed certificate, for clients to pin


def tls_files(mode: str | None, cert: Path | None, key: Path | None) -> TlsFiles | None:
    """What uvicorn serves HTTPS with, or None for plain HTTP; typed errors that say which
    flag to fix."""
    if mode not in (None, "self-signed"):
        raise InvalidSettingError(f"--tls {mode}: the only value is self-signed (or give "
                                  f"--tls-cert and --tls-key)")
    if mode and (cert or key):
        raise InvalidSettingError("--tls self-signed makes its own certificate; leave out "
                                  "--tls-cert and --tls-key, or --tls")
    if mode:
        folder = cache_dir() / SELF_SIGNED_DIR
        identity = load_identity(folder)
        path = folder / IDENTITY_FILE  # key and certificate in one file, mode 0600
        return TlsFiles(path, path, fingerprint(identity.cert_pem))
    if bool(cert) != bool(key):
        raise InvalidSettingError("give both --tls-cert and --tls-key (PEM files), or "
                                  "--tls self-signed")
    if cert is None or key is None:
        return None
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not path.is_file():
            raise InvalidSettingError(f"{flag} {path}: no such file; give a PEM file")
    return TlsFiles(cert, key, None)
