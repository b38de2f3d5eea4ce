"""The logging gRPC server: the inference-log consumer and query API (InferenceLogService).

Skeleton: the service is wired into the shared bootstrap (health, reflection,
interceptors, drain); its RPCs answer UNIMPLEMENTED until the logging issue lands.
"""

from __future__ import annotations

from infergrid.logging.v1 import logging_pb2, logging_pb2_grpc
from libs.server import GrpcService, Server, build_server
from libs.telemetry import Telemetry
from services.logging.config import LoggingConfig

SERVICE_NAME = logging_pb2.DESCRIPTOR.services_by_name["InferenceLogService"].full_name


class InferenceLogServiceServicer(logging_pb2_grpc.InferenceLogServiceServicer):
    """Translates InferenceLogService protos to the domain; every RPC is UNIMPLEMENTED for now."""


async def create_server(config: LoggingConfig, telemetry: Telemetry | None = None) -> Server:
    """Builds the logging server (bound, not started)."""
    servicer = InferenceLogServiceServicer()
    return build_server(
        config.server,
        [
            GrpcService(
                SERVICE_NAME,
                lambda s: logging_pb2_grpc.add_InferenceLogServiceServicer_to_server(servicer, s),
            )
        ],
        telemetry=telemetry,
    )
