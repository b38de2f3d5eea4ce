"""A self-signed certificate for the listener's optional TLS, generated locally with the openssl CLI."""

from __future__ import annotations

import logging
from pathlib import Path

from libs.mtls import openssl

log = logging.getLogger(__name__)


def ensure_self_signed(directory: Path, host: str = "localhost") -> tuple[Path, Path]:
    """Returns (certificate, key) in `directory`, creating a 2048-bit RSA pair valid 365 days if missing.

    Raises:
        RuntimeError: openssl is not installed or failed.
    """
    cert, key = directory / "listener.crt", directory / "listener.key"
    if cert.exists() and key.exists():
        return cert, key
    directory.mkdir(parents=True, exist_ok=True)
    openssl(
        [
            *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365"),
            *("-keyout", str(key), "-out", str(cert), "-subj", f"/CN={host}"),
            *("-addext", f"subjectAltName=DNS:{host},DNS:localhost,IP:127.0.0.1"),
        ]
    )
    key.chmod(0o600)
    log.info("generated a self-signed certificate %s", cert)
    return cert, key
