"""Readiness probes that speak a server's real protocol, each bounded by a short timeout."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from dataclasses import dataclass


def tcp_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True when something accepts TCP connections on `host:port` (a cheap pre-check, not readiness)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class HttpAnswer:
    """Status and body of an HTTP response."""

    status: int
    body: str


def http_get(url: str, timeout_s: float = 2.0) -> HttpAnswer | None:
    """GETs `url`; None when nothing answers. Error statuses are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return HttpAnswer(response.status, response.read().decode(errors="replace"))
    except urllib.error.HTTPError as exc:
        return HttpAnswer(exc.code, exc.read().decode(errors="replace"))
    except (OSError, ValueError):
        return None


def grpc_health_serving(host: str, port: int, service: str = "", timeout_s: float = 2.0) -> bool:
    """True when the gRPC server on `host:port` answers `grpc.health.v1` Check with SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
