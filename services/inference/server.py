"""The inference gRPC server: the Open Inference Protocol (KServe v2) model server.

Skeleton: the service is wired into the shared bootstrap (health, reflection,
interceptors, drain); its RPCs answer UNIMPLEMENTED until the inference issue lands.
"""

from __future__ import annotations

from inference import grpc_service_pb2, grpc_service_pb2_grpc
from libs.server import GrpcService, Server, build_server
from libs.telemetry import Telemetry
from services.inference.config import InferenceConfig

SERVICE_NAME = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class GRPCInferenceServiceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Translates GRPCInferenceService protos to the domain; every RPC is UNIMPLEMENTED for now."""


async def create_server(config: InferenceConfig, telemetry: Telemetry | None = None) -> Server:
    """Builds the inference server (bound, not started)."""
    servicer = GRPCInferenceServiceServicer()
    return build_server(
        config.server,
        [
            GrpcService(
                SERVICE_NAME,
                lambda s: grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, s),
            )
        ],
        telemetry=telemetry,
    )
