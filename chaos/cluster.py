"""The chaos suite's handle on a running cluster-profile stack: find replicas, signal, stop, start, scale.

Everything here goes through the stack's own components (`stack.cluster`): pid records, the supervisor
that restarts a dead replica as a kubelet would, and the discovery files it keeps. Nothing here signals a
process the stack did not start.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka.admin import AdminClient
from prometheus_client.parser import text_string_to_metric_families

from stack import cluster
from stack.component import Component
from stack.config import StackConfig
from stack.probes import http_get

LOG_TOPIC = "infergrid.inference-log.v1"
_REPLICA = re.compile(r"^(?P<service>[a-z]+)-(?P<index>\d+)$")
# Counters that grow by one per request a replica serves (its Prometheus endpoint).
_SERVED_METRIC = {
    "gateway": ("grpc_server_started_total", {"grpc_method": "Predict"}),
    "inference": ("infergrid_inference_requests_total", {}),
}


class ChaosError(RuntimeError):
    """The cluster did not do what a scenario waits for (a replica not restarted in time, ...)."""


@dataclass
class ClusterHandle:
    """A running cluster: its config and components by name (as `stack.cluster` builds them)."""

    config: StackConfig
    components: dict[str, Component]
    # Seconds to wait after a restarted replica is ready before the next (a Deployment's minReadySeconds).
    settle_s: float = 2.0
    scale_out_s: dict[str, float | None] = field(default_factory=dict)

    # Where things are.

    @property
    def envoy_target(self) -> str:
        return f"{self.config.host}:{self.config.port('envoy')}"

    @property
    def lake_dir(self) -> Path:
        return self.config.state_dir / "logging" / "lake"

    def cassandra_contact(self) -> tuple[list[str], int]:
        return cluster.cassandra_contact_points(self.config), self.config.port("cassandra")

    def kafka_bootstrap(self) -> str:
        return cluster.kafka_bootstrap_servers(self.config)

    # Replicas.

    def replicas(self, service: str) -> list[str]:
        """The running replicas of a service, by name (`gateway-1`, ...; `controlplane` for the singleton)."""
        names = [
            name
            for name in self.components
            if ((m := _REPLICA.match(name)) and m["service"] == service) or name == service
        ]
        return sorted((n for n in names if self.components[n].record() is not None), key=_natural)

    def cassandra_nodes(self) -> list[str]:
        return sorted((n for n in self.components if n.startswith("cassandra-")), key=_natural)

    def kafka_brokers(self) -> list[str]:
        return sorted((n for n in self.components if n.startswith("kafka-")), key=_natural)

    def pid(self, name: str) -> int:
        record = self.components[name].record()
        if record is None:
            raise ChaosError(f"{name} is not running")
        return record.pid

    def signal(self, name: str, signum: signal.Signals) -> None:
        """Sends `signum` to the process the stack started for `name` (and only to it)."""
        os.kill(self.pid(name), signum)

    def wait_restarted(self, name: str, old_pid: int, timeout_s: float) -> None:
        """Waits until the supervisor has restarted `name` (a new pid), it answers its readiness probe and
        its service's discovery file lists it: Ready as a rollout counts a pod (in the endpoints)."""
        component = self.components[name]
        service = name.rsplit("-", 1)[0]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            record = component.record()
            if (
                record is not None
                and record.pid != old_pid
                and component.ready()
                and (
                    service not in cluster.SERVICES  # a singleton (the control plane) has no discovery file
                    or cluster.replica_endpoint(self.config, record)
                    in cluster.read_discovery(self.config, service)
                )
            ):
                return
            time.sleep(0.2)
        raise ChaosError(f"{name} was not restarted, ready and in its endpoints within {timeout_s:.0f} s")

    def stop(self, name: str) -> None:
        """Stops a component through the stack (the supervisor leaves a stopped component alone)."""
        self.components[name].stop()

    def start(self, name: str) -> None:
        """Starts a component through the stack and waits until it is ready."""
        self.components[name].start()

    def add_replica(self, service: str) -> str:
        """Starts one more replica of `service` (supervised, in the discovery file once ready)."""
        component = cluster.add_replica(self.config, service)
        self.components[component.name] = component
        return component.name

    def remove_replica(self, name: str) -> None:
        """Stops an added replica through the stack (it leaves the discovery file)."""
        self.components[name].stop()

    def requests_served(self, name: str) -> float:
        """The replica's own count of requests served, from its Prometheus endpoint (0 when unreadable)."""
        component = self.components[name]
        service = _REPLICA.match(name)
        metric, labels = _SERVED_METRIC[service["service"] if service else name]
        port = next(p for n, p in component.ports.items() if n.endswith("metrics"))
        answer = http_get(f"http://{component.host}:{port}/metrics")
        if answer is None or answer.status != 200:
            return 0.0
        return _sum_counter(answer.body, metric, labels)

    def log_topic_leader(self) -> str:
        """The broker (component name) that leads most partitions of the inference-log topic."""
        admin = AdminClient(cluster.kafka_client_conf(self.config))
        topic = admin.list_topics(LOG_TOPIC, timeout=10).topics[LOG_TOPIC]
        leaders: dict[int, int] = {}
        for partition in topic.partitions.values():
            leaders[partition.leader] = leaders.get(partition.leader, 0) + 1
        node_id = max(leaders, key=lambda k: leaders[k])
        return f"kafka-{node_id}"


def _natural(name: str) -> tuple[str, int]:
    m = _REPLICA.match(name)
    return (m["service"], int(m["index"])) if m else (name, 0)


def _sum_counter(text: str, metric: str, labels: Mapping[str, str]) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
