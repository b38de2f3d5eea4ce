"""The faults: one per scenario, each injected into the running cluster while the load runs, then healed.

A scenario is an async function of the cluster and a `Marks` timeline; it blocks the event loop never
(process work runs in threads) and marks when its fault started and ended, which the report shades on the
timeline plot. The targets a scenario is held to are named by its `kind`.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from chaos.cluster import ClusterHandle

# What each kind of fault is held to (issue targets): the share of failed requests allowed.
FAILED_BUDGET = {
    "baseline": 0.0,  # no fault: the load alone; a failure here means the rate is past what the cluster sustains
    "sigkill": 0.001,  # one replica SIGKILLed: at most 0.1 % failed
    "rolling": 0.0,  # a rolling restart: none
    "node": 0.0,  # one Cassandra node or one Kafka broker down: none
    "outage": None,  # Kafka wholly down, Redis restarted: answers may fail, records must not be lost
    "scale": 0.0,  # replicas added under load: none
}


@dataclass
class Marks:
    """Events on the load's time axis (seconds since it started)."""

    clock: Callable[[], float]
    events: list[tuple[float, str]] = field(default_factory=list)
    fault_windows: list[tuple[float, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _open: float | None = None

    def mark(self, label: str) -> None:
        self.events.append((round(self.clock(), 2), label))

    def fault_start(self, label: str) -> None:
        self.mark(label)
        self._open = self.clock()

    def fault_end(self, label: str) -> None:
        self.mark(label)
        if self._open is not None:
            self.fault_windows.append((self._open, self.clock()))
            self._open = None


Fault = Callable[[ClusterHandle, Marks], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    """One fault, how it is judged, and whether the short suite in `make test` runs it."""

    name: str
    kind: str
    description: str
    fault: Fault
    quick: bool = False


def _steady(seconds: float) -> Fault:
    async def fault(cluster: ClusterHandle, marks: Marks) -> None:
        del cluster
        marks.mark(f"no fault for {seconds:.0f} s")
        await asyncio.sleep(seconds)

    return fault


def _sigkill(service: str) -> Fault:
    async def fault(cluster: ClusterHandle, marks: Marks) -> None:
        name = cluster.replicas(service)[0]
        old = cluster.pid(name)
        marks.fault_start(f"SIGKILL {name} (pid {old})")
        cluster.signal(name, signal.SIGKILL)
        await asyncio.to_thread(cluster.wait_restarted, name, old, 90.0)
        marks.fault_end(f"{name} restarted and ready")

    return fault


def _rolling(service: str) -> Fault:
    async def fault(cluster: ClusterHandle, marks: Marks) -> None:
        marks.fault_start(f"rolling restart of {service}")
        for name in cluster.replicas(service):
            old = cluster.pid(name)
            marks.mark(f"SIGTERM {name}")
            cluster.signal(name, signal.SIGTERM)
            await asyncio.to_thread(cluster.wait_restarted, name, old, 90.0)
            marks.mark(f"{name} ready")
            await asyncio.sleep(cluster.settle_s)  # as a Deployment's minReadySeconds
        marks.fault_end(f"rolling restart of {service} done")

    return fault


def _stopped_for(name_of: Callable[[ClusterHandle], str], seconds: float) -> Fault:
    async def fault(cluster: ClusterHandle, marks: Marks) -> None:
        name = name_of(cluster)
        marks.fault_start(f"stop {name}")
        await asyncio.to_thread(cluster.stop, name)
        marks.mark(f"{name} stopped")
        await asyncio.sleep(seconds)
        marks.mark(f"start {name}")
        await asyncio.to_thread(cluster.start, name)
        marks.fault_end(f"{name} ready again")

    return fault


def _redis_restart(cluster: ClusterHandle, marks: Marks) -> Awaitable[None]:
    return _stopped_for(lambda _c: "redis", 5.0)(cluster, marks)


def _kill_gateway_in_kafka_outage(outage_s: float) -> Fault:
    async def fault(cluster: ClusterHandle, marks: Marks) -> None:
        brokers = cluster.kafka_brokers()
        marks.fault_start("Kafka down (every broker)")
        await asyncio.gather(*(asyncio.to_thread(cluster.stop, b) for b in brokers))
        marks.mark("Kafka stopped")
        await asyncio.sleep(outage_s / 2)
        name = cluster.replicas("gateway")[0]
        old = cluster.pid(name)
        marks.mark(f"SIGKILL {name} (pid {old})")
        cluster.signal(name, signal.SIGKILL)
        await asyncio.to_thread(cluster.wait_restarted, name, old, 90.0)
        marks.mark(f"{name} restarted and ready")
        await asyncio.sleep(outage_s / 2)
        marks.mark("start Kafka")
        await asyncio.gather(*(asyncio.to_thread(cluster.start, b) for b in brokers))
        marks.fault_end("Kafka ready again")

    return fault


def _scale_out(services: tuple[str, ...], observe_s: float) -> Fault:
    async def fault(cluster: ClusterHandle, marks: Marks) -> None:
        marks.fault_start(f"add a replica of {', '.join(services)}")
        added = await asyncio.gather(*(asyncio.to_thread(cluster.add_replica, s) for s in services))
        ready_at = {name: time.monotonic() for name in added}
        for name in added:
            marks.mark(f"{name} ready")
        first: dict[str, float] = {}
        base = {name: cluster.requests_served(name) for name in added}
        deadline = time.monotonic() + observe_s
        while time.monotonic() < deadline and len(first) < len(added):
            for name in added:
                if name not in first and cluster.requests_served(name) > base[name]:
                    first[name] = time.monotonic() - ready_at[name]
                    marks.mark(f"{name} took its first request")
            await asyncio.sleep(0.2)
        for name in added:
            took = first.get(name)
            marks.notes.append(
                f"{name}: first request {took:.1f} s after it was ready"
                if took is not None
                else f"{name}: no request within {observe_s:.0f} s of being ready"
            )
            cluster.scale_out_s[name] = took
        await asyncio.sleep(2.0)
        for name in added:
            await asyncio.to_thread(cluster.remove_replica, name)
            marks.mark(f"{name} removed")
        marks.fault_end("scale-out done")

    return fault


def _log_leader(cluster: ClusterHandle) -> str:
    return cluster.log_topic_leader()


def _cassandra_node(cluster: ClusterHandle) -> str:
    return cluster.cassandra_nodes()[-1]


SERVICES = ("gateway", "features", "inference", "logging", "edge", "controlplane")


def all_scenarios(node_down_s: float = 60.0, outage_s: float = 30.0) -> list[Scenario]:
    """Every scenario of the full suite (`make chaos`), in run order; `quick` ones form the short suite."""
    quick_kill = {"gateway", "inference"}
    scenarios = [
        Scenario(
            "baseline",
            "baseline",
            "no fault: the load alone for 60 s, the latencies each fault is read against (and a rate the "
            "cluster does not sustain shows up here as failures)",
            _steady(60.0),
        )
    ]
    scenarios += [
        Scenario(
            f"sigkill-{service}",
            "sigkill",
            f"SIGKILL one {service} replica; the stack restarts it",
            _sigkill(service),
            quick=service in quick_kill,
        )
        for service in SERVICES
        if service != "controlplane"
    ]
    scenarios.append(
        Scenario(
            "sigkill-controlplane",
            "sigkill",
            "SIGKILL the xDS control plane; Envoy keeps its last config and reconnects",
            _sigkill("controlplane"),
        )
    )
    scenarios += [
        Scenario(
            f"rolling-{service}",
            "rolling",
            f"SIGTERM each {service} replica in turn, waiting for its restart",
            _rolling(service),
            quick=service == "gateway",
        )
        for service in SERVICES
        if service != "controlplane"
    ]
    scenarios += [
        Scenario(
            "cassandra-node-down",
            "node",
            f"stop one of the 3 Cassandra nodes for {node_down_s:.0f} s (RF 3, LOCAL_QUORUM)",
            _stopped_for(_cassandra_node, node_down_s),
        ),
        Scenario(
            "kafka-leader-down",
            "node",
            f"stop the broker leading most log-topic partitions for {node_down_s:.0f} s (RF 3, min ISR 2)",
            _stopped_for(_log_leader, node_down_s),
            quick=True,
        ),
        Scenario("redis-restart", "outage", "stop the Redis primary and start it again", _redis_restart),
        Scenario(
            "sigkill-gateway-kafka-outage",
            "outage",
            f"stop every Kafka broker for {outage_s:.0f} s and SIGKILL a gateway replica in the middle",
            _kill_gateway_in_kafka_outage(outage_s),
            quick=True,
        ),
        Scenario(
            "scale-out",
            "scale",
            "add a gateway and an inference replica under load; time to first request after ready",
            _scale_out(("gateway", "inference"), 30.0),
            quick=True,
        ),
    ]
    return scenarios
