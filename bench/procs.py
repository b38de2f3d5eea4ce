"""Processes the harness starts: pinned with taskset, logged to files, measured, and always stopped.

Every server is started in its own session (process group), so stopping it stops its children too
(tritonserver under PyTriton, gunicorn workers under Feast, SO_REUSEPORT workers); only groups this
harness started are ever signalled, by their id.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from libs.checkout import checkout_env
from libs.config import load_config
from libs.kafka import KafkaConfig
from libs.testing import REPO_ROOT


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def server_cpus() -> str | None:
    """The CPU list servers are pinned to (CPU 0), or None on a one-core machine."""
    return "0" if cpu_count() >= 2 and shutil.which("taskset") else None


def loadgen_cpus() -> str | None:
    """The CPU list load generators are pinned to (CPU 1), or None on a one-core machine."""
    return "1" if cpu_count() >= 2 and shutil.which("taskset") else None


def pinned(command: Sequence[str], cpus: str | None) -> list[str]:
    """`command` under `taskset -c cpus` (unchanged when cpus is None)."""
    return ["taskset", "-c", cpus, *command] if cpus else list(command)


def repo_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of libs.testing.spawn_module: the repository and generated code importable."""
    return checkout_env(extra)


# The publishers' (bench.walpub, bench.logpub) Kafka credentials: <prefix>KAFKA_SASL_USERNAME, ...
KAFKA_PREFIX = "INFERGRID_BENCH_"


def kafka_env(kafka: Any) -> dict[str, str]:
    """A publisher's variables for the stack's Kafka (`kafka`, a stack.kafka.Kafka), as its administrator."""
    from stack.kafka import credential_env

    return credential_env(kafka.config, "admin", KAFKA_PREFIX)


def publisher_kafka(bootstrap: str) -> KafkaConfig:
    """In a publisher: Kafka at `bootstrap` with the credentials `kafka_env` passed."""
    return load_config(
        KafkaConfig, {**os.environ, f"{KAFKA_PREFIX}KAFKA_BOOTSTRAP_SERVERS": bootstrap}, KAFKA_PREFIX
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Waits until something accepts TCP connections on loopback `port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f} s")


def group_cpu_seconds(pgid: int) -> float:
    """utime+stime of every live process in process group `pgid` (all threads), in seconds."""
    return pids_cpu_seconds(group_pids(pgid))


def pids_cpu_seconds(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


@dataclass
class Server:
    """A started server process (the leader of its own process group)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra_pids: list[int] = field(default_factory=list)  # pinned servers the stack started (Redis, ...)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.proc.pid) + pids_cpu_seconds(self.extra_pids)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ProcessSet:
    """Starts servers and stops all of them at the end (also on errors, SIGTERM and interpreter exit)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._servers: list[Server] = []
        self._cleanups: list[Callable[[], None]] = []
        atexit.register(self.stop_all)

    def start(
        self,
        name: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        cpus: str | None = None,
    ) -> Server:
        """Starts `command` pinned to `cpus`, its output in `<log_dir>/<name>.log`."""
        log_path = self.log_dir / f"{name}.log"
        log = log_path.open("ab")
        proc = subprocess.Popen(
            pinned(command, cpus),
            cwd=cwd or REPO_ROOT,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        server = Server(name, proc, log_path)
        self._servers.append(server)
        return server

    def on_stop(self, cleanup: Callable[[], None]) -> None:
        """Registers a cleanup (e.g. stopping a stack component) run by stop_all, last registered first."""
        self._cleanups.append(cleanup)

    def stop(self, server: Server, timeout: float = 15.0) -> None:
        """TERM to the server's process group, KILL after `timeout`."""
        if server in self._servers:
            self._servers.remove(server)
        if server.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGTERM)
            try:
                server.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.proc.pid, signal.SIGKILL)
                server.proc.wait(timeout=10)
        # Children that outlived their leader (same group id).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        """Stops every server and runs every cleanup; one failing (or interrupted) never skips the others."""
        for server in list(reversed(self._servers)):
            try:
                self.stop(server)
            except BaseException as exc:  # keep stopping the others, even on KeyboardInterrupt
                print(f"[bench] stopping {server.name} failed: {exc!r}", flush=True)
        for cleanup in list(reversed(self._cleanups)):
            try:
                cleanup()
                self._cleanups.remove(cleanup)
            except BaseException as exc:
                print(f"[bench] cleanup failed: {exc!r}", flush=True)


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group `pgid`."""
    out = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pgid:
                out.append(pid)
    return out


def set_affinity(pid: int, cpus: str | None) -> None:
    """Pins every thread of `pid` (a server the stack started) to `cpus`."""
    if cpus:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=False, capture_output=True)
