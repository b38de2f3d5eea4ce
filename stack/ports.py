"""Port names, their defaults, free-port checks and who holds a taken port."""

from __future__ import annotations

import errno
import random
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil

# The default ports (docs/architecture.md lists them). Each name `x` is overridden by the variable INFERGRID_<X>_PORT.
DEFAULT_PORTS: dict[str, int] = {
    "redis": 6379,
    "cassandra": 9042,
    "cassandra_storage": 7000,
    "kafka": 9092,
    "kafka_controller": 9093,
    "jaeger_otlp_grpc": 4317,
    "jaeger_otlp_http": 4318,
    "jaeger_query": 16686,
    "jaeger_query_grpc": 16685,
    "prometheus": 9090,
    # The operator console (services/console): its web page and JSON API.
    "console": 8090,
    "envoy": 8080,
    "envoy_admin": 9901,
    "controlplane": 18000,
    "controlplane_metrics": 9106,
    "edge": 50060,
    "edge_metrics": 9107,
    "gateway": 50051,
    "gateway_metrics": 9101,
    # The cluster profile's gateways: plaintext gRPC health beside their mutual-TLS port.
    "gateway_health": 50056,
    "features": 50052,
    "features_metrics": 9102,
    # The feature stream ingester (python -m services.features.ingest_stream): metrics only.
    "features_ingest_metrics": 9108,
    "logging": 50054,
    "logging_metrics": 9104,
    "inference": 8001,
    "inference_http": 8000,
    "inference_metrics": 8002,
}


def port_env_var(name: str) -> str:
    """Returns the environment variable that overrides the port called `name`."""
    return f"INFERGRID_{name.upper()}_PORT"


def is_port_free(host: str, port: int) -> bool:
    """Tells whether a listener could bind `host:port` now (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def find_free_ports(host: str, count: int, exclude: set[int] | None = None) -> list[int]:
    """Picks `count` distinct free ports below the kernel's ephemeral range.

    Servers such as Cassandra bind their ports seconds after they start; a port from the ephemeral range
    could meanwhile be taken as the source port of some outgoing connection, one below it cannot.
    """
    low, _ = _ephemeral_range()
    first = 20000 if low > 21000 else 1024
    taken = set(exclude or ())
    chosen: list[int] = []
    candidates = list(range(first, low))
    random.shuffle(candidates)
    for port in candidates:
        if port not in taken and is_port_free(host, port):
            chosen.append(port)
            taken.add(port)
            if len(chosen) == count:
                return chosen
    raise OSError(f"no {count} free ports between {first} and {low} on {host}")


@dataclass(frozen=True)
class PortHolder:
    """The process listening on a port, as far as the socket table tells (empty when it belongs to another user)."""

    pid: int | None
    command: str

    def describe(self) -> str:
        """Returns e.g. 'pid 1234 (python3 -m http.server)'."""
        if self.pid is None:
            return "a process this user cannot see"
        return f"pid {self.pid} ({self.command})"


def find_port_holder(port: int) -> PortHolder:
    """Finds the process that listens on `port` (TCP, IPv4 or IPv6) in the kernel's socket table."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return PortHolder(None, "")
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return PortHolder(conn.pid, _command_line(conn.pid))
    return PortHolder(None, "")


def _command_line(pid: int) -> str:
    try:
        text = " ".join(psutil.Process(pid).cmdline()).strip()
    except psutil.Error:
        return "?"
    return text if len(text) <= 120 else text[:117] + "..."
