"""Configuration of the gateway service, read once from INFERGRID_GATEWAY_* variables."""

from __future__ import annotations

from dataclasses import dataclass, field

from libs.server import ServerConfig
from libs.telemetry import TelemetryConfig

ENV_PREFIX = "INFERGRID_GATEWAY_"


@dataclass(frozen=True)
class GatewayServerConfig(ServerConfig):
    port: int = 50051


@dataclass(frozen=True)
class GatewayTelemetryConfig(TelemetryConfig):
    metrics_port: int = 9101


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway service reads at start-up."""

    server: GatewayServerConfig = field(default_factory=GatewayServerConfig)
    telemetry: GatewayTelemetryConfig = field(default_factory=GatewayTelemetryConfig)
