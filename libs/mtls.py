"""The mesh's mutual TLS between Envoy and the gateway: a local CA, its certificates, and the peer check.

Why: the gateway must tell a call that came through Envoy (which authenticated it, or carries the
identity the edge service verified) from one that any pod or process on the network sent to its port.
A header cannot say that (anyone can send it); a client certificate signed by a CA whose key only the
mesh's issuer holds can. The gateway serves its port with `server_credentials` (client certificates
required and verified against the CA), and `peer_is_envoy` checks the verified peer's name on each call.
Envoy gets its client certificate and the CA from the control plane over SDS (services/controlplane).

Locally the stack creates the CA and both certificates once (`ensure_mesh_certificates`, openssl CLI);
in a cluster they come from Secrets (deploy/k8s).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

# The common name of the client certificate Envoy presents to the gateway.
ENVOY_IDENTITY = "envoy"
GATEWAY_IDENTITY = "gateway"
_DAYS = "825"


class MeshFiles:
    """The PEM files of the mesh in one folder."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca_cert, self.ca_key = directory / "ca.crt", directory / "ca.key"
        self.gateway_cert, self.gateway_key = directory / "gateway.crt", directory / "gateway.key"
        self.envoy_cert, self.envoy_key = directory / "envoy.crt", directory / "envoy.key"


def openssl(args: Sequence[str]) -> None:
    """Runs the openssl command with `args`; RuntimeError when it is missing or fails."""
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("creating certificates needs the openssl command, which is not installed")
    result = subprocess.run([binary, *args], capture_output=True, text=True, check=False, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()[-500:]}")


def _issue(files: MeshFiles, name: str, sans: Sequence[str], usage: str) -> None:
    cert, key = files.directory / f"{name}.crt", files.directory / f"{name}.key"
    csr = cert.with_suffix(".csr")
    ext = cert.with_suffix(".ext")
    subject = f"/CN={name}/O=infergrid-mesh"
    openssl(
        [
            *("req", "-new", "-newkey", "rsa:2048", "-nodes"),
            *("-keyout", str(key), "-out", str(csr), "-subj", subject),
        ]
    )
    ext.write_text(
        f"subjectAltName={','.join(sans)}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
    )
    openssl(
        [
            *("x509", "-req", "-in", str(csr), "-CA", str(files.ca_cert), "-CAkey", str(files.ca_key)),
            *("-CAcreateserial", "-days", _DAYS, "-sha256", "-extfile", str(ext), "-out", str(cert)),
        ]
    )
    key.chmod(0o600)
    csr.unlink(missing_ok=True)
    ext.unlink(missing_ok=True)


def ensure_mesh_certificates(directory: Path, gateway_hosts: Sequence[str] = ()) -> MeshFiles:
    """Creates the CA, the gateway's server certificate and Envoy's client certificate when missing.

    Args:
        directory: Where the PEM files live (created 0700; keys 0600).
        gateway_hosts: Extra DNS names of the gateway (its certificate always names localhost and 127.0.0.1).

    Raises:
        RuntimeError: openssl is missing or failed.
    """
    files = MeshFiles(directory)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    if not (files.ca_cert.exists() and files.ca_key.exists()):
        openssl(
            [
                *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", _DAYS),
                *("-keyout", str(files.ca_key)),
                *("-out", str(files.ca_cert), "-subj", "/CN=infergrid-mesh-ca/O=infergrid-mesh"),
                *("-addext", "basicConstraints=critical,CA:TRUE"),
                *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
            ]
        )
        files.ca_key.chmod(0o600)
        for stale in (files.gateway_cert, files.envoy_cert):
            stale.unlink(missing_ok=True)
        log.info("created the mesh CA %s", files.ca_cert)
    if not (files.gateway_cert.exists() and files.gateway_key.exists()):
        sans = ["DNS:localhost", "IP:127.0.0.1", "DNS:gateway", *(f"DNS:{h}" for h in gateway_hosts)]
        _issue(files, GATEWAY_IDENTITY, sans, "serverAuth")
    if not (files.envoy_cert.exists() and files.envoy_key.exists()):
        _issue(files, ENVOY_IDENTITY, [f"DNS:{ENVOY_IDENTITY}"], "clientAuth")
    return files


def server_credentials(ca_file: Path, cert_file: Path, key_file: Path) -> grpc.ServerCredentials:
    """gRPC server credentials that require a client certificate signed by the CA in `ca_file`."""
    return grpc.ssl_server_credentials(
        [(key_file.read_bytes(), cert_file.read_bytes())],
        root_certificates=ca_file.read_bytes(),
        require_client_auth=True,
    )


def channel_credentials(ca_file: Path, cert_file: Path, key_file: Path) -> grpc.ChannelCredentials:
    """gRPC channel credentials presenting a client certificate (probes and tests acting as Envoy)."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes(),
        private_key=key_file.read_bytes(),
        certificate_chain=cert_file.read_bytes(),
    )


def verified_peer_name(auth_context: Mapping[str, Sequence[bytes]]) -> str:
    """The common name of a TLS-verified client certificate; "" for a plaintext or unverified peer."""
    if list(auth_context.get("transport_security_type", ())) != [b"ssl"]:
        return ""
    names = list(auth_context.get("x509_common_name", ()))
    return names[0].decode(errors="replace") if len(names) == 1 else ""


def peer_is_envoy(auth_context: Mapping[str, Sequence[bytes]]) -> bool:
    """True when the call arrived over mTLS from the holder of Envoy's mesh certificate."""
    return verified_peer_name(auth_context) == ENVOY_IDENTITY
