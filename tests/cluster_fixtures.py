"""A session-scoped pytest fixture that runs the cluster profile of the stack (see `stack.cluster`).

    def test_something(stack_cluster):
        gateway = stack_cluster.components["gateway-1"]
        stack_cluster.config.port("envoy")

`stack_cluster` starts the whole cluster once per session (`stack.lifecycle.up`, the code path of
`make up PROFILE=cluster`): three Cassandra nodes and three Kafka brokers on 127.0.0.1..3, Redis and its
replica, Jaeger, two replicas of each service, the control plane, the supervisor and Envoy, on free ports
(each service's base port + 10·k free for k < 4, so added replicas fit) and in a state folder of its own
(`.state/test/session-<pid>/cluster`), and stops it at the end (`down`), also on failure. The demo API key
is fixed by the session (`demo_key`). With INFERGRID_REUSE_STACK=1 it uses the cluster that
`make up PROFILE=cluster` started (and leaves it running; it must be up).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cassandra.auth import PlainTextAuthProvider

from stack import cluster
from stack.cassandra import admin_auth
from stack.component import Component
from stack.config import StackConfig, node_address
from stack.errors import StackError
from stack.lifecycle import down, up
from stack.ports import DEFAULT_PORTS, _ephemeral_range, is_port_free
from tests.stack_fixtures import KEEP_VARIABLE, REUSE_VARIABLE, _truthy, session_state_dir

DEMO_KEY_VARIABLE = "INFERGRID_DEMO_API_KEY"
# Ports bound on every node address (127.0.0.1..3).
_NODE_PORTS = {"cassandra", "cassandra_storage", "kafka", "kafka_controller", "redis"}
_REPLICA_PORTS = {name for names in cluster.SERVICE_PORT_NAMES.values() for name in names}
# Room for replicas added by tests (add_replica): base + PORT_STRIDE·k free for k < this.
_REPLICA_SLOTS = 4


@dataclass
class RunningCluster:
    """A started cluster: its config, its components by name, and the demo API key it accepts."""

    config: StackConfig
    components: dict[str, Component] = field(default_factory=dict)
    demo_key: str = ""

    def component(self, name: str) -> Component:
        """One component by name (also replicas added since the start)."""
        return self.components.get(name) or cluster.component(self.config, name)

    @property
    def cassandra_auth(self) -> PlainTextAuthProvider:
        """Cassandra's administrator: `Cluster(cluster.cassandra_contact_points(config), port=...,
        auth_provider=stack_cluster.cassandra_auth)`; the services log in as their roles (`stack.cassandra`)."""
        return admin_auth(self.config)


def free_cluster_ports(host: str = "127.0.0.1", exclude: set[int] | None = None) -> dict[str, int]:
    """A port for every name of DEFAULT_PORTS, free where the cluster binds it (every node address for
    the servers, base + 10·k for k < 4 for the service replicas), below the ephemeral range, and none of
    `exclude` (the session stack's ports: its servers start lazily, so a port of theirs may still be free)."""
    low, _ = _ephemeral_range()
    first = 20000 if low > 21000 else 1024
    nodes = [node_address(host, n) for n in range(1, cluster.NODES + 1)]
    taken: set[int] = set(exclude or ())
    chosen: dict[str, int] = {}
    candidate = first + secrets.randbelow(max(1, low - first - 2000))
    for name in DEFAULT_PORTS:
        hosts = nodes if name in _NODE_PORTS else [host]
        offsets = [cluster.PORT_STRIDE * k for k in range(_REPLICA_SLOTS)] if name in _REPLICA_PORTS else [0]
        while True:
            candidate += 1
            if candidate + max(offsets) >= low:
                candidate = first
            wanted = [candidate + offset for offset in offsets]
            if any(port in taken for port in wanted):
                continue
            if all(is_port_free(h, port) for h in hosts for port in wanted):
                break
        chosen[name] = candidate
        taken.update(wanted)
    return chosen


def cluster_session_config(
    env: dict[str, str] | os._Environ[str], exclude: set[int] | None = None
) -> StackConfig:
    """The session's cluster: free ports (none of `exclude`), state in `.state/test/session-<pid>/cluster`."""
    base = cluster.cluster_config(env)
    state_dir = session_state_dir() / "cluster"
    return dataclasses.replace(
        base,
        state_dir=state_dir,
        ports=free_cluster_ports(base.host, exclude),
        platform_file=state_dir / "platform.yaml",
    )


@pytest.fixture(scope="session")
def stack_cluster(stack_config: StackConfig, request: pytest.FixtureRequest) -> Iterator[RunningCluster]:
    """The cluster profile, started once per session and stopped at its end (see the module docstring)."""
    # Requested for its clean-up of stale sessions' servers, and for its ports, which the session's own
    # servers take only when first asked for: the cluster must not take them meanwhile (CI saw its Envoy
    # on the session Jaeger's port).
    session_ports = set(stack_config.ports.values())
    if _truthy(os.environ.get(REUSE_VARIABLE)):
        config = cluster.cluster_config()
        components = cluster.components(config)
        if components[cluster.SUPERVISOR].record() is None:
            pytest.fail("INFERGRID_REUSE_STACK=1 but no cluster runs: `make up PROFILE=cluster` first")
        yield RunningCluster(config, components, os.environ.get(DEMO_KEY_VARIABLE, ""))
        return
    config = cluster_session_config(os.environ, session_ports)
    demo_key = os.environ.get(DEMO_KEY_VARIABLE) or f"ig_test_{secrets.token_urlsafe(24)}"
    previous = os.environ.get(DEMO_KEY_VARIABLE)
    os.environ[DEMO_KEY_VARIABLE] = demo_key  # read by the edge's start (`keys ensure --key-from-env`)
    try:
        up(config, [], sys.stderr)
    except StackError:
        down(config, [], sys.stderr)
        raise
    finally:
        if previous is None:
            os.environ.pop(DEMO_KEY_VARIABLE, None)
    try:
        yield RunningCluster(config, cluster.components(config), demo_key)
    finally:
        down(config, [], sys.stderr)
        if request.session.testsfailed == 0 and not _truthy(os.environ.get(KEEP_VARIABLE)):
            shutil.rmtree(config.state_dir, ignore_errors=True)
        else:
            print(f"\n[stack] cluster state and logs kept in {config.state_dir}", file=sys.stderr)


def cluster_state_dir() -> Path:
    """Where this session's cluster keeps its state."""
    return session_state_dir() / "cluster"
