"""The cluster profile's supervisor: a kubelet and an endpoints controller for the service replicas.

`python -m stack supervise` (the `supervisor` component, started by `up` just before Envoy, stopped first
by `down`) loops every 0.5 s:

1. Restarts a replica (`<service>-<i>`, stack.cluster.SERVICES) whose pid record exists but whose process
   died: SIGKILL, a crash, or SIGTERM from a rolling restart. `Component.stop()` removes the record before
   it signals, so a replica stopped through the stack stays stopped. The control plane and Envoy (each
   one Deployment in Kubernetes) are restarted the same way; the infrastructure (Cassandra, Kafka, Redis,
   Jaeger) never is. A process that fails to start again is retried with a growing back-off (0.5 s
   doubling to 30 s), like CrashLoopBackOff.
2. Probes every replica's gRPC health (1 s timeout, concurrently) and writes, atomically, one file per
   service, `<state>/discovery/<service>.json` = `{"endpoints": ["127.0.0.1:50051", ...]}`, listing the
   READY replicas (a headless Service's DNS / EndpointSlice), with a kubelet's readiness rules
   (`Readiness`): a replica joins on its first SERVING answer; it leaves at once when it answers
   NOT_SERVING (a draining replica, after SIGTERM, leaves the file before it stops) or when its process
   is gone, but a live replica that merely fails to answer leaves only after `FAILURE_THRESHOLD`
   consecutive misses (Kubernetes' default failureThreshold), so one slow probe on a loaded machine
   does not empty the service's endpoints.
3. Touches `<state>/run/supervisor.heartbeat` (its readiness).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType
from typing import TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stack import cluster
from stack.component import Component
from stack.config import StackConfig
from stack.process import ProcessRecord, find_marked_processes, terminate_marked
from stack.progress import Progress
from stack.prometheus import render_targets_of

INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 1.0
# Consecutive unanswered probes before a live replica leaves its discovery file (kubelet's default).
FAILURE_THRESHOLD = 3
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
# A restarted replica alive this long has its back-off reset.
STABLE_S = 30.0
# Single-copy components restarted like replicas (Deployments in Kubernetes), but in no discovery file.
RESTARTED_SINGLETONS = ("controlplane", "envoy")


@dataclass
class _Restarts:
    """Per replica: consecutive failed restarts and the earliest time of the next attempt."""

    failures: int = 0
    not_before: float = 0.0
    last_started: float = 0.0


Replica = tuple[str, int]  # (name, pid): a restarted replica is a new one, READY only once it answers


class Readiness:
    """Which replicas are READY, from each round's probe verdicts (see the module docstring, step 2)."""

    def __init__(self, failure_threshold: int = FAILURE_THRESHOLD) -> None:
        self.failure_threshold = failure_threshold
        self._ready: set[Replica] = set()
        self._misses: dict[Replica, int] = {}

    def update(self, verdicts: dict[Replica, bool | None]) -> set[Replica]:
        """Takes one round's verdicts of the live replicas (True SERVING, False another answer, None no
        answer) and returns the READY ones; a replica missing from `verdicts` has no live process."""
        self._ready &= set(verdicts)
        self._misses = {replica: n for replica, n in self._misses.items() if replica in verdicts}
        for replica, verdict in verdicts.items():
            if verdict is None:
                self._misses[replica] = self._misses.get(replica, 0) + 1
                if self._misses[replica] >= self.failure_threshold:
                    self._ready.discard(replica)
                continue
            self._misses[replica] = 0
            if verdict:
                self._ready.add(replica)
            else:
                self._ready.discard(replica)
        return set(self._ready)


class Supervisor:
    """One supervision loop over a cluster's state folder (see the module docstring)."""

    def __init__(self, config: StackConfig, out: TextIO | None = None) -> None:
        """Binds the loop to a cluster config; `out` receives one line per event (default stdout)."""
        self.config = config
        self.out = out or sys.stdout
        self._channels: dict[str, grpc.Channel] = {}
        self._restarting: dict[str, Future[None]] = {}
        self._restarts: dict[str, _Restarts] = {}
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="supervisor")
        self._stopping = threading.Event()
        self._readiness = Readiness()

    def say(self, message: str) -> None:
        """One timestamped line."""
        print(f"{time.strftime('%H:%M:%S')} [supervisor] {message}", file=self.out, flush=True)

    # The loop.

    def run(self) -> None:
        """Supervises until SIGTERM or SIGINT."""

        def _stop(signum: int, frame: FrameType | None) -> None:
            self._stopping.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        self.say(f"supervising {self.config.state_dir}: services {', '.join(cluster.SERVICES)}")
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except Exception as exc:  # one bad round must not end supervision
                self.say(f"round failed: {exc!r}")
            self._stopping.wait(max(0.0, INTERVAL_S - (time.monotonic() - started)))
        self.say("stopping")
        self.close()

    def tick(self) -> dict[str, list[str]]:
        """One round: restart the dead, probe the living, write the discovery files, beat.

        Returns:
            The READY endpoints per service.
        """
        _reap_children()
        records = self._replica_records()
        for name, record in {**records, **self._singleton_records()}.items():
            if record.pid > 0 and not record.is_alive():
                self._maybe_restart(name, record)
        ready = self.publish(records)
        heartbeat = self.config.run_dir / f"{cluster.SUPERVISOR}.heartbeat"
        heartbeat.parent.mkdir(parents=True, exist_ok=True)
        heartbeat.touch()
        return ready

    def publish(self, records: dict[str, ProcessRecord] | None = None) -> dict[str, list[str]]:
        """Probes the live replicas and writes each service's discovery file (when it changed).

        Returns:
            The READY endpoints per service.
        """
        if records is None:
            records = self._replica_records()
        alive = {name: r for name, r in records.items() if r.pid > 0 and r.is_alive()}
        probes = {name: self._pool.submit(self._serving, r) for name, r in alive.items()}
        ready: dict[str, list[str]] = {service: [] for service in cluster.SERVICES}
        verdicts = {(name, alive[name].pid): probe.result() for name, probe in probes.items()}
        for name, _ in sorted(self._readiness.update(verdicts)):
            service = name.rsplit("-", 1)[0]
            ready[service].append(cluster.replica_endpoint(self.config, alive[name]))
        for service, endpoints in ready.items():
            if cluster.write_discovery(self.config, service, endpoints):
                self.say(f"{service}: endpoints {sorted(endpoints)}")
        # Prometheus scrapes every replica with a record, ready or not (a dead one shows as up == 0).
        render_targets_of(self.config, {name: r.ports for name, r in records.items()}, self.config.host)
        return ready

    def close(self) -> None:
        """Releases the probe channels and threads (after `publish` outside `run`)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    # Restarts.

    def _replica_records(self) -> dict[str, ProcessRecord]:
        records = {}
        if self.config.run_dir.is_dir():
            for pid_file in self.config.run_dir.glob("*.json"):
                if cluster.parse_replica(pid_file.stem) is None:
                    continue
                record = ProcessRecord.read(pid_file)
                if record is not None:
                    records[pid_file.stem] = record
        return records

    def _singleton_records(self) -> dict[str, ProcessRecord]:
        records = {}
        for name in RESTARTED_SINGLETONS:
            record = ProcessRecord.read(self.config.run_dir / f"{name}.json")
            if record is not None:
                records[name] = record
        return records

    def _maybe_restart(self, name: str, record: ProcessRecord) -> None:
        running = self._restarting.get(name)
        if running is not None and not running.done():
            return
        state = self._restarts.setdefault(name, _Restarts())
        now = time.monotonic()
        if state.last_started and now - state.last_started > STABLE_S:
            state.failures = 0
        if now < state.not_before:
            return
        self._restarting[name] = self._pool.submit(self._restart, name, record, state)

    def _restart(self, name: str, dead: ProcessRecord, state: _Restarts) -> None:
        pid_path = self.config.run_dir / f"{name}.json"
        # Stopped through the stack meanwhile (its record removed, or replaced by a new start): leave it.
        if ProcessRecord.read(pid_path) != dead:
            return
        self.say(f"{name}: process {dead.pid} died; restarting (attempt {state.failures + 1})")
        # Helpers of the dead process that outlived it (workers holding its ports) go first.
        for leftover in find_marked_processes(str(self.config.state_dir)):
            if leftover.component == name:
                terminate_marked(leftover, 5.0)
        parsed = cluster.parse_replica(name)
        replica: Component = (
            cluster.replica(self.config, parsed[0], parsed[1], dead.ports)
            if parsed is not None
            else cluster.component(self.config, name)
        )
        started = time.monotonic()
        try:
            record = replica.start(Progress(name, self.out))
        except Exception as exc:
            state.failures += 1
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (state.failures - 1))
            state.not_before = time.monotonic() + delay
            self.say(f"{name}: restart failed ({exc}); next attempt in {delay:.1f} s")
            # Keeps the dead record, so the next round tries again (unless someone stopped it meanwhile).
            if not pid_path.exists():
                dead.write(pid_path)
            return
        state.last_started = time.monotonic()
        self.say(f"{name}: restarted as pid {record.pid} in {time.monotonic() - started:.1f} s")

    # Probes.

    def _serving(self, record: ProcessRecord) -> bool | None:
        """True if the replica answers SERVING, False for another answer, None when it does not answer."""
        # A mutual-TLS gateway answers health on its plaintext health port.
        port = record.ports.get("gateway_health") or record.ports[cluster.main_port_name(record)]
        address = f"{self.config.host}:{port}"
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.insecure_channel(address)
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S
            )
        except grpc.RpcError:
            return None
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _reap_children() -> None:
    """Collects exited children (replicas this process restarted), so none lingers as a zombie."""
    with contextlib.suppress(ChildProcessError):
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return


def publish_discovery(config: StackConfig) -> dict[str, list[str]]:
    """One round of probes written to the discovery files, without restarting anything (`up` between steps).

    Returns:
        The READY endpoints per service.
    """
    supervisor = Supervisor(config, out=open(os.devnull, "w"))  # noqa: SIM115 - closed with the object
    try:
        return supervisor.publish()
    finally:
        supervisor.close()
        supervisor.out.close()
