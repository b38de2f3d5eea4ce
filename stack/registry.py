"""The components `make up` starts, in start order: the servers, the InferGrid services, then Envoy.

The single profile's are registered here; the cluster profile's come from `stack.cluster`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from stack.cassandra import Cassandra
from stack.component import Component
from stack.config import StackConfig
from stack.envoy import Envoy
from stack.errors import StackError
from stack.jaeger import Jaeger
from stack.kafka import Kafka
from stack.prometheus import Prometheus
from stack.redis import Redis
from stack.services import (
    console,
    controlplane,
    edge,
    features,
    features_ingest,
    gateway,
    inference,
    logging,
)

ComponentFactory = Callable[[StackConfig], Component]


# Start order; `down` stops in reverse. To add a server or service: write a Component (or build a
# CommandComponent), give its ports defaults in stack.ports.DEFAULT_PORTS, and register it here.
COMPONENTS: dict[str, ComponentFactory] = {
    "redis": Redis,
    "cassandra": Cassandra,
    "kafka": Kafka,
    "jaeger": Jaeger,
    # Scrapes every metrics port (file_sd targets written when it starts); rules from deploy/k8s/monitoring.
    "prometheus": Prometheus,
    "inference": inference,
    # Its start loads the demo feature values once (python -m stack.demo_features).
    "features": features,
    # Kafka feature updates (infergrid.features.updates) into the same store; after the demo views exist.
    "features-ingest": features_ingest,
    "logging": logging,
    "gateway": gateway,
    "edge": edge,
    # Envoy comes after the control plane: it is ready only once its first listener arrived over ADS.
    "controlplane": controlplane,
    "envoy": Envoy,
    # The operator console: http://127.0.0.1:8090/ (Prometheus, Jaeger and the services, read only).
    "console": console,
}


def stages(config: StackConfig, names: Sequence[str] = ()) -> list[list[Component]]:
    """The named components (all of them when `names` is empty) in start order, grouped.

    The components of one group start (and stop) together; `down` stops the groups in reverse order. In
    the cluster profile a name also selects the numbered instances of a kind: `cassandra` selects
    `cassandra-1..3`, `gateway` every `gateway-<i>`.

    Raises:
        StackError: an unknown name; the message lists the known ones.
    """
    if config.is_cluster:
        from stack import cluster

        groups = cluster.stages(config)
    else:
        groups = [[factory(config)] for factory in COMPONENTS.values()]
    known = [component.name for group in groups for component in group]

    def _selected(name: str, wanted: str) -> bool:
        return name == wanted or re.fullmatch(rf"{re.escape(wanted)}-[0-9]+", name) is not None

    unknown = [wanted for wanted in names if not any(_selected(name, wanted) for name in known)]
    if unknown:
        raise StackError(f"unknown component(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if not names:
        return groups
    chosen = [[c for c in group if any(_selected(c.name, wanted) for wanted in names)] for group in groups]
    return [group for group in chosen if group]


def select(config: StackConfig, names: Sequence[str]) -> list[Component]:
    """The named components in start order (all of them when `names` is empty).

    Raises:
        StackError: an unknown name; the message lists the known ones.
    """
    return [component for group in stages(config, names) for component in group]
