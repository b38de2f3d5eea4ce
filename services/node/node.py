"""A node: the features, inference and gateway servers in one process, the gateway calling the other two
in process (`libs.inproc`) instead of over gRPC.

Each service is built by its own `create_server` from its own `INFERGRID_<SERVICE>_*` variables, and
each still serves its own port (feature writes, Triton clients and perf_analyzer reach them as before).
What the node changes (`colocate`):
- the gateway's `features_target` and `inference_target` become `inproc:features` and `inproc:inference`,
  and its inference calls are unary (in-process calls are; a stream buys nothing without a network);
- features and inference serve on the grpc.aio transport (their handlers must be coroutines on the
  node's one event loop) and share the gateway's `WORKERS` (each worker process is a whole node, its
  ports shared through SO_REUSEPORT).
Traces, logs and metrics are the node's (service name `node`, the gateway's telemetry settings): a call's
features and inference spans are children of its gateway span.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from libs.config import ConfigError, load_config, redacted
from libs.server import WORKER_ENV, Server, serve
from libs.telemetry import Telemetry
from services.features.config import FeaturesConfig
from services.features.server import create_server as create_features
from services.gateway.config import GatewayConfig, per_process
from services.gateway.server import create_server as create_gateway
from services.inference.config import InferenceConfig, check_repository
from services.inference.server import create_server as create_inference

log = logging.getLogger(__name__)

FEATURES = "features"
INFERENCE = "inference"


@dataclass(frozen=True)
class NodeConfig:
    """The three services' configs, as the node runs them (`colocate`)."""

    features: FeaturesConfig
    inference: InferenceConfig
    gateway: GatewayConfig


def colocate(features: FeaturesConfig, inference: InferenceConfig, gateway: GatewayConfig) -> NodeConfig:
    """The configs with the node's changes (see the module docstring)."""
    workers = gateway.server.workers

    def _on_loop(server: object) -> object:
        return dataclasses.replace(server, transport="aio", workers=workers)  # type: ignore[type-var]

    upstream = dataclasses.replace(
        gateway.upstream,
        features_target=f"inproc:{FEATURES}",
        inference_target=f"inproc:{INFERENCE}",
        inference_streaming=False,
    )
    return NodeConfig(
        features=dataclasses.replace(features, server=_on_loop(features.server)),  # type: ignore[arg-type]
        inference=dataclasses.replace(inference, server=_on_loop(inference.server)),  # type: ignore[arg-type]
        gateway=dataclasses.replace(gateway, upstream=upstream),
    )


def load(environ: Mapping[str, str], worker: str | None = None) -> NodeConfig:
    """The node's configs from the environment (each service's own prefix), checked and colocated.

    Raises:
        ConfigError: A missing or malformed value; names the variable.
    """
    features = load_config(FeaturesConfig, environ, "INFERGRID_FEATURES_")
    inference = check_repository(load_config(InferenceConfig, environ, "INFERGRID_INFERENCE_"), worker)
    gateway = per_process(load_config(GatewayConfig, environ, "INFERGRID_GATEWAY_"), worker)
    return colocate(features, inference, gateway)


async def create_node(config: NodeConfig, telemetry: Telemetry | None = None) -> Server:
    """Builds and starts features and inference, publishes them in process, then builds the gateway.

    Returns the gateway's server (bound, not started); stopping it stops the other two after it.
    """
    features = await create_features(config.features, telemetry)
    inference = await create_inference(config.inference, telemetry)
    features.publish(FEATURES)
    inference.publish(INFERENCE)
    started: list[tuple[Server, float]] = []
    try:
        for server, grace in (
            (features, config.features.server.grace_seconds),
            (inference, config.inference.server.grace_seconds),
        ):
            await server.start()
            started.append((server, grace))
        gateway = await create_gateway(config.gateway, telemetry)
    except BaseException:
        for server, grace in reversed(started):
            await server.stop(0, grace)
        raise
    log.info(
        "node: features on port %d, inference on port %d, called in process by the gateway",
        features.port,
        inference.port,
    )

    async def _stop_backends() -> None:
        # After the gateway: its last in-flight calls still reach them while it drains.
        for server, grace in reversed(started):
            await server.stop(0, grace)

    gateway.on_stop.append(_stop_backends)
    return gateway


def main() -> None:
    """`python -m services.node`: the node until SIGTERM/SIGINT (exit status 2 on a bad config)."""
    try:
        config = load(os.environ, os.environ.get(WORKER_ENV))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    async def factory(telemetry: Telemetry) -> Server:
        log.info("config", extra={"config": {k: redacted(v) for k, v in vars(config).items()}})
        return await create_node(config, telemetry)

    gateway = config.gateway
    try:
        serve("node", gateway.server, gateway.telemetry, factory, os.environ)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
