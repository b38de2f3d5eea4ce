"""The components `make up` starts, in start order: the servers, the InferGrid services, then Envoy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from stack.cassandra import Cassandra
from stack.component import Component
from stack.config import StackConfig
from stack.envoy import Envoy
from stack.errors import StackError
from stack.jaeger import Jaeger
from stack.kafka import Kafka
from stack.redis import Redis
from stack.services import controlplane, edge, features, gateway, inference, logging

ComponentFactory = Callable[[StackConfig], Component]


# Start order; `down` stops in reverse. To add a server or service: write a Component (or build a
# CommandComponent), give its ports defaults in stack.ports.DEFAULT_PORTS, and register it here.
COMPONENTS: dict[str, ComponentFactory] = {
    "redis": Redis,
    "cassandra": Cassandra,
    "kafka": Kafka,
    "jaeger": Jaeger,
    "inference": inference,
    # Its start loads the demo feature values once (python -m services.features.demo).
    "features": features,
    "logging": logging,
    "gateway": gateway,
    "edge": edge,
    # Envoy comes after the control plane: it is ready only once its first listener arrived over ADS.
    "controlplane": controlplane,
    "envoy": Envoy,
}


def select(config: StackConfig, names: Sequence[str]) -> list[Component]:
    """The named components in start order (all of them when `names` is empty).

    Raises:
        StackError: an unknown name; the message lists the known ones.
    """
    unknown = [name for name in names if name not in COMPONENTS]
    if unknown:
        raise StackError(f"unknown component(s) {', '.join(unknown)}; known: {', '.join(COMPONENTS)}")
    wanted = set(names) or set(COMPONENTS)
    return [factory(config) for name, factory in COMPONENTS.items() if name in wanted]
