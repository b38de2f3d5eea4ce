"""A small test service on the shared bootstrap: FeatureService.GetFeatureView behaves as the name says.

`python -m libs.tests.echo_service` runs it with ECHO_* settings, for lifecycle tests in a real process.
"""

from __future__ import annotations

import asyncio
import os
import threading

import grpc
from opentelemetry import trace

from infergrid.features.v1 import features_pb2, features_pb2_grpc
from libs.config import load_config_or_exit
from libs.errors import InvalidArgument, NotFound, Unavailable
from libs.server import GrpcService, Server, ServerConfig, build_server, serve
from libs.telemetry import Telemetry, TelemetryConfig

SERVICE = features_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name
# The names GetFeatureView fails for, each with the status and details a caller must get.
FAILURES = [
    ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "name: must not be 'invalid'"),
    ("missing", grpc.StatusCode.NOT_FOUND, "feature view 'missing' not found"),
    ("down", grpc.StatusCode.UNAVAILABLE, "backend down"),
    ("boom", grpc.StatusCode.INTERNAL, "internal error"),
]


class EchoServicer(features_pb2_grpc.FeatureServiceServicer):
    """`slow:<s>` sleeps, `invalid`/`missing`/`down` raise typed errors, `boom` a bug, `pid` says who,
    `thread` which thread ran it; ListFeatureViews is a plain `def` saying which thread ran it."""

    async def GetFeatureView(  # noqa: N802 - gRPC method name
        self, request: features_pb2.GetFeatureViewRequest, context: object
    ) -> features_pb2.FeatureView:
        name = request.name
        if name.startswith("slow:"):
            await asyncio.sleep(float(name.split(":", 1)[1]))
        elif name == "invalid":
            raise InvalidArgument("name: must not be 'invalid'")
        elif name == "missing":
            raise NotFound("feature view 'missing' not found")
        elif name == "down":
            raise Unavailable("backend down")
        elif name == "boom":
            raise RuntimeError("a bug with a secret=hunter2 in it")
        elif name == "thread":
            return features_pb2.FeatureView(name=name, description=_where())
        elif name == "trace":  # the trace the handler's code runs in (what its own outgoing calls carry)
            context_of = trace.get_current_span().get_span_context()
            return features_pb2.FeatureView(name=name, description=format(context_of.trace_id, "032x"))
        elif name == "peer":  # the verified client certificate's name (TLS)
            names = context.auth_context().get("x509_common_name", [b""])  # type: ignore[attr-defined]
            return features_pb2.FeatureView(name=name, description=names[0].decode())
        return features_pb2.FeatureView(name=name, description=str(os.getpid()))

    def ListFeatureViews(  # noqa: N802 - gRPC method name
        self, request: features_pb2.ListFeatureViewsRequest, context: object
    ) -> features_pb2.ListFeatureViewsResponse:
        return features_pb2.ListFeatureViewsResponse(
            feature_views=[features_pb2.FeatureView(name="thread", description=_where())]
        )


def _where() -> str:
    """The running thread's name, and whether an event loop runs in it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return f"{threading.current_thread().name} without a loop"
    return f"{threading.current_thread().name} in a loop"


def build(
    config: ServerConfig,
    telemetry: Telemetry | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> Server:
    servicer = EchoServicer()
    return build_server(
        config,
        [GrpcService.of(SERVICE, features_pb2_grpc.add_FeatureServiceServicer_to_server, servicer)],
        telemetry=telemetry,
        credentials=credentials,
    )


def main() -> None:
    config = load_config_or_exit(ServerConfig, os.environ, "ECHO_")
    telemetry_config = load_config_or_exit(TelemetryConfig, os.environ, "ECHO_")

    async def factory(telemetry: Telemetry) -> Server:
        return build(config, telemetry)

    serve("echo", config, telemetry_config, factory, os.environ)


if __name__ == "__main__":
    main()
