"""Port names, their defaults, free-port checks and who holds a taken port."""

from __future__ import annotations

import errno
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

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
    """The process listening on a port, as far as /proc tells (empty when it belongs to another user)."""

    pid: int | None
    command: str

    def describe(self) -> str:
        """Returns e.g. 'pid 1234 (python3 -m http.server)'."""
        if self.pid is None:
            return "a process this user cannot see"
        return f"pid {self.pid} ({self.command})"


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(inode)
    return inodes


def find_port_holder(port: int) -> PortHolder:
    """Finds the process that listens on `port` by matching socket inodes under /proc (Linux)."""
    targets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if targets:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            if _fd_links(entry / "fd") & targets:
                return PortHolder(int(entry.name), _command_line(int(entry.name)))
    return PortHolder(None, "")


def _fd_links(fd_dir: Path) -> set[str]:
    links: set[str] = set()
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return links
    for fd in fds:
        try:
            links.add(os.readlink(fd))
        except OSError:  # closed meanwhile
            continue
    return links


def _command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return text if len(text) <= 120 else text[:117] + "..."
