"""The gateway gRPC server: the public PredictionService (behind Envoy).

Skeleton: the service is wired into the shared bootstrap (health, reflection,
interceptors, drain); its RPCs answer UNIMPLEMENTED until the gateway issue lands.
"""

from __future__ import annotations

from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from libs.server import GrpcService, Server, build_server
from libs.telemetry import Telemetry
from services.gateway.config import GatewayConfig

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name


class PredictionServiceServicer(gateway_pb2_grpc.PredictionServiceServicer):
    """Translates PredictionService protos to the domain; every RPC is UNIMPLEMENTED for now."""


async def create_server(config: GatewayConfig, telemetry: Telemetry | None = None) -> Server:
    """Builds the gateway server (bound, not started)."""
    servicer = PredictionServiceServicer()
    return build_server(
        config.server,
        [
            GrpcService(
                SERVICE_NAME,
                lambda s: gateway_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, s),
            )
        ],
        telemetry=telemetry,
    )
