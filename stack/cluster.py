"""The cluster profile: three Cassandra nodes, three Kafka brokers, Redis with a replica, two replicas of
each service, one control plane and Envoy, and a supervisor, on loopback (`make up PROFILE=cluster`).

Layout (default ports; every one moves with the same INFERGRID_<NAME>_PORT variables as the single profile):

- `cassandra-1..3` on 127.0.0.1..3 (CQL 9042, storage 7000 on each), one token each, seeded by node 1;
  the services' keyspaces at replication factor 3 (NetworkTopologyStrategy, `datacenter1`, the data
  center SimpleSnitch reports), read and written at LOCAL_QUORUM.
- `kafka-1..3` (node ids 1..3) on 127.0.0.1..3 (broker 9092, controller 9093 on each): combined
  broker+controller nodes, a static three-voter quorum, every topic at replication factor 3 with
  min.insync.replicas 2. Clients authenticate as in the single profile (SASL/SCRAM, `stack.kafka`): the
  brokers share one state folder's users and passwords.
- `redis` on 127.0.0.1 with an append-only file; `redis-replica` on 127.0.0.2, same port.
- `<service>-<i>` for inference, features, logging, gateway and edge: replica i on the base port
  + 10·(i-1) (metrics likewise), all on 127.0.0.1; the logging replicas are one consumer group writing one
  lake; each gateway replica has its own spool.
- `jaeger`, `controlplane`, `envoy` once; `supervisor` (stack.supervisor) restarts dead replicas and
  writes `<state>/discovery/<service>.json`, which the gateways (inference and features targets), the
  control plane (edge) and the platform file (gateway endpoints) follow.

The chaos suite's handle: `components(config)` (every component by name), `add_replica(config, service)`,
each component's `record()`, `start()`, `stop()`, `host` and `ports`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from libs.mtls import MeshFiles, ensure_mesh_certificates
from stack.cassandra import Cassandra
from stack.cassandra import credential_env as cassandra_credentials
from stack.component import Component
from stack.config import StackConfig, node_address, replace_if_changed
from stack.envoy import Envoy
from stack.errors import StackError, StartupError
from stack.jaeger import Jaeger
from stack.kafka import ADMIN_USER, Kafka
from stack.process import ProcessRecord
from stack.progress import Progress
from stack.prometheus import Prometheus
from stack.redis import Redis, credential_env
from stack.services import controlplane, edge, features, gateway, inference, logging, python_env

NODES = 3
REPLICAS = 2
# Replica i of a service listens on its base ports + PORT_STRIDE·(i-1).
PORT_STRIDE = 10
# The replicated services, in start order.
SERVICES = ("inference", "features", "logging", "gateway", "edge")
SERVICE_PORT_NAMES: dict[str, tuple[str, ...]] = {
    "inference": ("inference", "inference_metrics", "inference_http"),
    "features": ("features", "features_metrics"),
    "logging": ("logging", "logging_metrics"),
    "gateway": ("gateway", "gateway_metrics", "gateway_health"),
    "edge": ("edge", "edge_metrics"),
}
# SimpleSnitch puts every node in this data center (the driver's default local DC too).
DATA_CENTER = "datacenter1"
KEYSPACE_REPLICATION = f"{{'class': 'NetworkTopologyStrategy', '{DATA_CENTER}': {NODES}}}"
CONSISTENCY = "LOCAL_QUORUM"
TOPIC_REPLICATION = 3
TOPIC_MIN_INSYNC_REPLICAS = 2
SUPERVISOR = "supervisor"
HEARTBEAT_STALE_S = 5.0

_REPLICA_NAME = re.compile(r"^(?P<service>[a-z]+)-(?P<index>[1-9][0-9]*)$")
_add_lock = threading.Lock()
_adding: set[str] = set()


def cluster_config(env: Mapping[str, str] | None = None) -> StackConfig:
    """The cluster profile's config from the environment (default: `os.environ`); state in .state/cluster."""
    return StackConfig.from_env(os.environ if env is None else env, profile="cluster")


def parse_replica(name: str) -> tuple[str, int] | None:
    """`gateway-2` → ("gateway", 2); None for a name that is not a service replica."""
    match = _REPLICA_NAME.match(name)
    if match is None or match["service"] not in SERVICES:
        return None
    return match["service"], int(match["index"])


# Where clients connect.


def node_addresses(config: StackConfig) -> list[str]:
    """127.0.0.1, 127.0.0.2, 127.0.0.3: the Cassandra nodes' and Kafka brokers' addresses."""
    return [node_address(config.host, node) for node in range(1, NODES + 1)]


def cassandra_contact_points(config: StackConfig) -> list[str]:
    """Every Cassandra node (CQL on `config.port('cassandra')` on each)."""
    return node_addresses(config)


def kafka_bootstrap_servers(config: StackConfig) -> str:
    """Every broker, for `bootstrap.servers`."""
    return ",".join(f"{address}:{config.port('kafka')}" for address in node_addresses(config))


def kafka_client_conf(config: StackConfig, user: str = ADMIN_USER) -> dict[str, Any]:
    """librdkafka settings for every broker as Kafka user `user` (default: the administrator, for the tests
    and the chaos suite; the services log in as their own users, `stack.kafka.credential_env`). They hold
    the password: for clients, never for a log."""
    return {
        **Kafka(config, node=1, nodes=NODES).client_conf(user),
        "bootstrap.servers": kafka_bootstrap_servers(config),
    }


def redis_url(config: StackConfig) -> str:
    """The primary (the replica is a standby: nobody reads from it); without credentials: each service
    logs in as its own user (`stack.redis.credential_env`), the administrator with `Redis.url`."""
    return f"redis://{config.host}:{config.port('redis')}/0"


# Discovery files.


def discovery_dir(config: StackConfig) -> Path:
    """The supervisor's endpoint files, one per service."""
    return config.state_dir / "discovery"


def discovery_path(config: StackConfig, service: str) -> Path:
    """`<state>/discovery/<service>.json`: `{"endpoints": ["127.0.0.1:50051", ...]}`, the READY replicas."""
    return discovery_dir(config) / f"{service}.json"


def discovery_target(config: StackConfig, service: str) -> str:
    """The discovery target (libs/discovery.py) that follows the service's READY replicas."""
    return f"file:{discovery_path(config, service)}"


def read_discovery(config: StackConfig, service: str) -> list[str]:
    """The endpoints the service's discovery file lists now ([] when it is missing or unreadable)."""
    try:
        endpoints = json.loads(discovery_path(config, service).read_text())["endpoints"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [str(endpoint) for endpoint in endpoints]


def main_port_name(record: ProcessRecord) -> str:
    """The replica's main port's name: its service's first port name."""
    return SERVICE_PORT_NAMES[record.component.rsplit("-", 1)[0]][0]


def replica_endpoint(config: StackConfig, record: ProcessRecord) -> str:
    """The replica's main gRPC address, what clients dial and what its discovery file lists."""
    return f"{config.host}:{record.ports[main_port_name(record)]}"


def write_discovery(config: StackConfig, service: str, endpoints: list[str]) -> bool:
    """Writes the service's discovery file atomically (temp file + rename) when its content changes.

    Returns:
        True when the file was (re)written.
    """
    return replace_if_changed(
        discovery_path(config, service), json.dumps({"endpoints": sorted(endpoints)}) + "\n"
    )


def mesh_dir(config: StackConfig) -> Path:
    """The Envoy → gateway mutual TLS files (libs/mtls.py): CA, gateway and Envoy certificates."""
    return config.state_dir / "mesh"


def prepare(config: StackConfig) -> None:
    """Before `up`: the platform file rendered, the mesh certificates created (both once per state)."""
    render_platform(config)
    ensure_mesh_certificates(mesh_dir(config))


def render_platform(config: StackConfig) -> Path:
    """Writes `<state>/platform.yaml` from deploy/local/platform-cluster.yaml unless it exists (live edits stay)."""
    target = config.platform_file
    if target.exists():
        return target
    text = (config.deploy_dir / "platform-cluster.yaml").read_text()
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp")
    temp.write_text(text.replace("${GATEWAY_DISCOVERY}", str(discovery_path(config, "gateway"))))
    os.replace(temp, target)
    return target


# Components.


def replica_ports(config: StackConfig, service: str, index: int) -> dict[str, int]:
    """Replica `index` (1-based) of `service`: its base ports + PORT_STRIDE·(index-1)."""
    return {name: config.port(name) + PORT_STRIDE * (index - 1) for name in SERVICE_PORT_NAMES[service]}


def _cassandra_env(config: StackConfig, service: str) -> dict[str, str]:
    prefix = f"INFERGRID_{service.upper()}_"
    return {
        f"{prefix}CASSANDRA_CONTACT_POINTS": ",".join(cassandra_contact_points(config)),
        f"{prefix}CASSANDRA_PORT": str(config.port("cassandra")),
        f"{prefix}CASSANDRA_LOCAL_DC": DATA_CENTER,
        f"{prefix}CASSANDRA_REPLICATION": KEYSPACE_REPLICATION,
        f"{prefix}CASSANDRA_READ_CONSISTENCY": CONSISTENCY,
        f"{prefix}CASSANDRA_WRITE_CONSISTENCY": CONSISTENCY,
        # features' and logging's own roles (the ingester is a features process).
        **cassandra_credentials(config, service, f"{prefix}CASSANDRA"),
    }


def _replica_env(config: StackConfig, service: str) -> dict[str, str]:
    """What a replica gets on top of the single profile's variables: the cluster's backends and targets."""
    prefix = f"INFERGRID_{service.upper()}_"
    if service == "features":
        return {
            **_cassandra_env(config, service),
            f"{prefix}REDIS_URL": redis_url(config),
            **credential_env(config, "features", f"{prefix}REDIS"),
            f"{prefix}KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap_servers(config),
        }
    if service == "logging":
        return {
            **_cassandra_env(config, service),
            f"{prefix}KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap_servers(config),
            f"{prefix}TOPIC_REPLICATION": str(TOPIC_REPLICATION),
            f"{prefix}TOPIC_MIN_INSYNC_REPLICAS": str(TOPIC_MIN_INSYNC_REPLICAS),
            # Lake files every 5 s (30 s by default): the chaos suite reconciles sooner; smaller files.
            f"{prefix}LAKE_ROLL_SECONDS": "5",
        }
    if service == "gateway":
        mesh = MeshFiles(mesh_dir(config))
        return {
            # Only Envoy's mesh certificate gets in (admission is at the edge); health stays plaintext.
            f"{prefix}TLS_CA_FILE": str(mesh.ca_cert),
            f"{prefix}TLS_CERT_FILE": str(mesh.gateway_cert),
            f"{prefix}TLS_KEY_FILE": str(mesh.gateway_key),
            f"{prefix}FEATURES_TARGET": discovery_target(config, "features"),
            f"{prefix}INFERENCE_TARGET": discovery_target(config, "inference"),
            f"{prefix}KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap_servers(config),
            f"{prefix}ADMISSION_REDIS_URL": redis_url(config),
            **credential_env(config, "gateway", f"{prefix}ADMISSION_REDIS"),
            **credential_env(config, "gateway", f"{prefix}RESPONSE_CACHE_REDIS"),
        }
    if service == "edge":
        return {f"{prefix}REDIS_URL": redis_url(config), **credential_env(config, "edge", f"{prefix}REDIS")}
    return {}


def replica(
    config: StackConfig, service: str, index: int, ports: Mapping[str, int] | None = None
) -> Component:
    """Replica `index` of `service` (`<service>-<index>`), on `ports` or those of `replica_ports`."""
    if service not in SERVICES:
        raise StackError(f"unknown service {service!r}; the replicated ones: {', '.join(SERVICES)}")
    name = f"{service}-{index}"
    chosen = {**replica_ports(config, service, index), **(ports or {})}
    env = _replica_env(config, service)
    built: Component
    if service == "inference":
        built = inference(config, name=name, ports=chosen, env=env)
    elif service == "features":
        built = features(
            config, name=name, ports=chosen, env=env, demo_marker_dir=config.state_dir / "cassandra-1"
        )
    elif service == "logging":
        built = logging(config, name=name, ports=chosen, env=env)
    elif service == "gateway":
        built = gateway(config, name=name, ports=chosen, env=env)
    else:
        built = edge(config, name=name, ports=chosen, env=env)
    built.supervised = True
    return built


class Supervisor(Component):
    """The supervisor process (`python -m stack supervise`, see stack.supervisor); ready once it beats."""

    kind = SUPERVISOR
    port_names = ()
    start_timeout_s = 30.0
    stop_timeout_s = 10.0

    @property
    def heartbeat_path(self) -> Path:
        """Touched after every round of probes."""
        return self.config.run_dir / f"{self.name}.heartbeat"

    def command(self) -> list[str]:
        """This interpreter running the stack CLI's `supervise`."""
        return [sys.executable, "-m", "stack", "supervise"]

    def environment(self) -> dict[str, str]:
        """The checkout's import paths and this config, so the process sees the same cluster."""
        return {**python_env(self.config), **self.config.to_env()}

    def ready(self) -> bool:
        """The heartbeat is fresh and newer than the running process."""
        record = ProcessRecord.read(self.pid_path)
        try:
            beat = self.heartbeat_path.stat().st_mtime
        except OSError:
            return False
        fresh = time.time() - beat < HEARTBEAT_STALE_S
        return fresh and (record is None or beat >= record.started_at - 1)

    def endpoints(self) -> dict[str, str]:
        """The discovery folder."""
        return {"discovery": str(discovery_dir(self.config))}


def infrastructure(config: StackConfig) -> list[Component]:
    """cassandra-1..3, kafka-1..3, redis, redis-replica, jaeger, prometheus."""
    cassandra_nodes: list[Component] = [Cassandra(config, node=n, nodes=NODES) for n in range(1, NODES + 1)]
    kafka_nodes: list[Component] = [Kafka(config, node=n, nodes=NODES) for n in range(1, NODES + 1)]
    primary = Redis(config, appendonly=True)
    standby = Redis(config, name="redis-replica", node=2, replica_of=primary)
    return [*cassandra_nodes, *kafka_nodes, primary, standby, Jaeger(config), Prometheus(config)]


def _added_replicas(config: StackConfig) -> list[tuple[str, int, dict[str, int]]]:
    """Replicas beyond the first REPLICAS that have a pid record (added with `add_replica`)."""
    found = []
    if config.run_dir.is_dir():
        for pid_file in config.run_dir.glob("*.json"):
            parsed = parse_replica(pid_file.stem)
            if parsed is None or parsed[1] <= REPLICAS:
                continue
            record = ProcessRecord.read(pid_file)
            found.append((parsed[0], parsed[1], dict(record.ports) if record else {}))
    return sorted(found)


def stages(config: StackConfig) -> list[list[Component]]:
    """Every component in start order, grouped: the components of one group start together.

    The three Cassandra nodes and the three Kafka brokers start together, six JVMs at once: a Kafka quorum
    of voters must run before any broker is ready, the Cassandra nodes each wait for their peers, and on
    two cores this is the fastest order measured (warm: 43 s for the whole `up` against 66 s with the
    Cassandra nodes first, then the brokers; the seed node first, then the two others, is slower still:
    56 s for Cassandra alone on a restart). The service replicas start one at a time (the first of a
    service runs its demo step once).
    """
    infra = infrastructure(config)
    groups: list[list[Component]] = [
        infra[0 : 2 * NODES],
        *([c] for c in infra[2 * NODES :]),
    ]
    added = _added_replicas(config)
    for service in SERVICES:
        for index in range(1, REPLICAS + 1):
            groups.append([replica(config, service, index)])
        groups.extend([replica(config, s, i, p)] for s, i, p in added if s == service)
    plane_env = {
        "INFERGRID_CONTROLPLANE_EDGE_ADDRESS": discovery_target(config, "edge"),
        # Envoy's client certificate for the gateways, sent over SDS.
        "INFERGRID_CONTROLPLANE_MESH_DIR": str(mesh_dir(config)),
    }
    plane, envoy = controlplane(config, env=plane_env), Envoy(config)
    plane.supervised = envoy.supervised = True  # restarted like the replicas (stack.supervisor)
    groups.append([plane])
    groups.append([Supervisor(config)])
    groups.append([envoy])
    return groups


def components(config: StackConfig) -> dict[str, Component]:
    """Every component of the cluster by name, in start order (with replicas added by `add_replica`)."""
    return {component.name: component for group in stages(config) for component in group}


def component(config: StackConfig, name: str) -> Component:
    """One component by name (`cassandra-2`, `gateway-1`, `gateway-3` once added, `supervisor`, ...)."""
    parsed = parse_replica(name)
    if parsed is not None:
        record = ProcessRecord.read(config.run_dir / f"{name}.json")
        return replica(config, parsed[0], parsed[1], record.ports if record else None)
    found = components(config).get(name)
    if found is None:
        raise StackError(f"no cluster component {name!r}; known: {', '.join(components(config))}")
    return found


def replicas(config: StackConfig, service: str) -> list[Component]:
    """The service's replicas that have a pid record (running, or dead and about to be restarted)."""
    found = []
    if config.run_dir.is_dir():
        for pid_file in config.run_dir.glob(f"{service}-*.json"):
            parsed = parse_replica(pid_file.stem)
            if parsed is not None and parsed[0] == service:
                found.append(component(config, pid_file.stem))
    return sorted(found, key=lambda c: int(c.name.rsplit("-", 1)[1]))


def add_replica(config: StackConfig, service: str) -> Component:
    """Starts replica N+1 of `service` and waits until it is ready (like scaling a Deployment up).

    The new replica is `<service>-<N+1>` on its base ports + 10·N; the supervisor adds it to the
    service's discovery file once its health is SERVING, and restarts it if it dies. Stop it with
    `stop()` (then the supervisor leaves it alone and drops it from discovery).

    Raises:
        StackError: it did not start (port taken, not ready in time); nothing is left running.
    """
    if service not in SERVICES:
        raise StackError(f"unknown service {service!r}; the replicated ones: {', '.join(SERVICES)}")
    with _add_lock:  # concurrent calls pick different indexes
        index = REPLICAS + 1
        while (config.run_dir / f"{service}-{index}.json").exists() or f"{service}-{index}" in _adding:
            index += 1
        added = replica(config, service, index)
        _adding.add(added.name)
    try:
        added.start()
    finally:
        with _add_lock:
            _adding.discard(added.name)
    return added


def stop_order(groups: list[list[Component]]) -> list[list[Component]]:
    """`down`'s order: the supervisor first (it would restart what is stopped), Envoy, the control plane,
    every service replica at once, then the servers in reverse start order (each group together)."""
    flat = [c for group in groups for c in group]
    first = [[c] for name in (SUPERVISOR, "envoy", "controlplane") for c in flat if c.name == name]
    replicas_now = [c for c in flat if parse_replica(c.name) is not None]
    rest = [
        kept
        for group in reversed(groups)
        if (kept := [c for c in group if c.name not in (SUPERVISOR, "envoy", "controlplane")])
        and parse_replica(kept[0].name) is None
    ]
    return [*first, *([replicas_now] if replicas_now else []), *rest]


def shared_state(config: StackConfig) -> list[Path]:
    """What the replicas share in the state folder (deleted by a full `clean-state`)."""
    paths = [
        discovery_dir(config),
        mesh_dir(config),
        config.secrets_dir,
        config.state_dir / "kafka-cluster-id",
        *(config.state_dir / service for service in SERVICES),
    ]
    if config.platform_file.is_relative_to(config.state_dir):  # never a platform file of the checkout
        paths.append(config.platform_file)
    return paths


RING_TIMEOUT_S = 90.0


def after_group(config: StackConfig, group: list[Component], out: TextIO | None = None) -> None:
    """What `up` does after a group started: the ring formed (all Cassandra nodes started together see
    each other up) and its roles set up, then the discovery files refreshed so the next replica finds the
    ones before it.

    Raises:
        StartupError: the Cassandra nodes did not all see each other within RING_TIMEOUT_S, or their
            roles could not be set up.
    """
    nodes = [c for c in group if isinstance(c, Cassandra)]
    if len(nodes) == NODES:
        started = time.monotonic()
        deadline = started + RING_TIMEOUT_S
        waiting = list(nodes)
        while waiting:
            waiting = [node for node in waiting if not node.sees_peers("ALL")]
            if waiting and time.monotonic() > deadline:
                raise StartupError(
                    f"{', '.join(n.name for n in waiting)} did not see every node up within "
                    f"{RING_TIMEOUT_S:.0f} s (read at ALL of system_distributed); see their logs in "
                    f"{config.log_dir}"
                )
            if waiting:
                time.sleep(0.5)
        Progress("cassandra", out).say(f"ring of {NODES} nodes formed in {time.monotonic() - started:.1f} s")
        nodes[0].setup_roles(KEYSPACE_REPLICATION)  # system_auth on every node, the services' roles
    from stack.supervisor import publish_discovery

    publish_discovery(config)
