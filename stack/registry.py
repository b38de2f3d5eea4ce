"""The components `make up` starts, in start order; later issues add the InferGrid services here."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence

from stack.cassandra import Cassandra
from stack.component import CommandComponent, Component
from stack.config import StackConfig
from stack.envoy import Envoy
from stack.errors import StackError
from stack.jaeger import Jaeger
from stack.kafka import Kafka
from stack.probes import grpc_health_serving
from stack.progress import Progress
from stack.redis import Redis

ComponentFactory = Callable[[StackConfig], Component]


def _python_env(config: StackConfig) -> dict[str, str]:
    """What an InferGrid service needs from the checkout: its modules and the generated code."""
    paths = [str(config.repo_root), str(config.repo_root / "build" / "gen")]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def _platform_file(config: StackConfig) -> str:
    return str(config.repo_root / "deploy" / "local" / "platform.yaml")


def _keys_file(config: StackConfig) -> str:
    """The hashed API keys of the local stack: in its state folder, never in the checkout."""
    return str(config.state_dir / "edge" / "keys.yaml")


DEMO_KEY_VARIABLE = "INFERGRID_DEMO_API_KEY"


class _Edge(CommandComponent):
    """The edge service; before it starts, the demo tenant gets its API key (from the variable, or minted)."""

    def prepare(self) -> None:
        """Registers the demo key: INFERGRID_DEMO_API_KEY when set, else a new one printed once."""
        super().prepare()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.edge.keys",
                "--platform",
                _platform_file(self.config),
                "--keys-file",
                _keys_file(self.config),
                "ensure",
                "--tenant",
                "demo",
                "--name",
                "demo",
                "--key-from-env",
                DEMO_KEY_VARIABLE,
            ],
            cwd=self.config.repo_root,
            env={**os.environ, **_python_env(self.config)},
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if result.returncode != 0:
            raise StackError(f"edge: could not register the demo API key: {result.stderr.strip()}")
        Progress(self.name).say(result.stdout.strip())


def edge(config: StackConfig) -> Component:
    """The edge service: Envoy's ext_authz (API keys) and rate-limit service (Redis token buckets)."""
    return _Edge(
        config,
        name="edge",
        port_names=("edge",),
        command=[sys.executable, "-m", "services.edge"],
        env={
            **_python_env(config),
            "INFERGRID_EDGE_PORT": str(config.port("edge")),
            "INFERGRID_EDGE_PLATFORM_FILE": _platform_file(config),
            "INFERGRID_EDGE_KEYS_FILE": _keys_file(config),
            "INFERGRID_EDGE_REDIS_URL": f"redis://{config.host}:{config.port('redis')}/0",
        },
        probe=lambda c: grpc_health_serving(c.host, c.port),
        start_timeout_s=30.0,
    )


def controlplane(config: StackConfig) -> Component:
    """The xDS control plane: Envoy's listener, routes, clusters and endpoints from the platform file."""
    return CommandComponent(
        config,
        name="controlplane",
        port_names=("controlplane",),
        command=[sys.executable, "-m", "services.controlplane"],
        env={
            **_python_env(config),
            "INFERGRID_CONTROLPLANE_PORT": str(config.port("controlplane")),
            "INFERGRID_CONTROLPLANE_PLATFORM_FILE": _platform_file(config),
            "INFERGRID_CONTROLPLANE_DESCRIPTOR_SET": str(
                config.repo_root / "build" / "gen" / "descriptors.pb"
            ),
            "INFERGRID_CONTROLPLANE_EDGE_ADDRESS": f"{config.host}:{config.port('edge')}",
            "INFERGRID_CONTROLPLANE_LISTENER_PORT": str(config.port("envoy")),
            "INFERGRID_CONTROLPLANE_TRACING_OTLP_ADDRESS": f"{config.host}:{config.port('jaeger_otlp_grpc')}",
            "INFERGRID_CONTROLPLANE_TLS_DIR": str(config.state_dir / "controlplane" / "tls"),
        },
        probe=lambda c: grpc_health_serving(c.host, c.port),
        start_timeout_s=30.0,
    )


# Start order; `down` stops in reverse. To add a server or service: write a Component (or build a
# CommandComponent), give its ports defaults in stack.ports.DEFAULT_PORTS, and register it here.
COMPONENTS: dict[str, ComponentFactory] = {
    "redis": Redis,
    "cassandra": Cassandra,
    "kafka": Kafka,
    "jaeger": Jaeger,
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
