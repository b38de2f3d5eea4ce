"""The features gRPC server: the online feature store (FeatureService).

Skeleton: the service is wired into the shared bootstrap (health, reflection,
interceptors, drain); its RPCs answer UNIMPLEMENTED until the features issue lands.
"""

from __future__ import annotations

from infergrid.features.v1 import features_pb2, features_pb2_grpc
from libs.server import GrpcService, Server, build_server
from libs.telemetry import Telemetry
from services.features.config import FeaturesConfig

SERVICE_NAME = features_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name


class FeatureServiceServicer(features_pb2_grpc.FeatureServiceServicer):
    """Translates FeatureService protos to the domain; every RPC is UNIMPLEMENTED for now."""


async def create_server(config: FeaturesConfig, telemetry: Telemetry | None = None) -> Server:
    """Builds the features server (bound, not started)."""
    servicer = FeatureServiceServicer()
    return build_server(
        config.server,
        [
            GrpcService(
                SERVICE_NAME,
                lambda s: features_pb2_grpc.add_FeatureServiceServicer_to_server(servicer, s),
            )
        ],
        telemetry=telemetry,
    )
