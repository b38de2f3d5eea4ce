"""Configuration of the inference service, read once from INFERGRID_INFERENCE_* variables."""

from __future__ import annotations

from dataclasses import dataclass, field

from libs.server import ServerConfig
from libs.telemetry import TelemetryConfig

ENV_PREFIX = "INFERGRID_INFERENCE_"


@dataclass(frozen=True)
class InferenceServerConfig(ServerConfig):
    port: int = 8001


@dataclass(frozen=True)
class InferenceTelemetryConfig(TelemetryConfig):
    metrics_port: int = 8002


@dataclass(frozen=True)
class InferenceConfig:
    """Everything the inference service reads at start-up."""

    server: InferenceServerConfig = field(default_factory=InferenceServerConfig)
    telemetry: InferenceTelemetryConfig = field(default_factory=InferenceTelemetryConfig)
