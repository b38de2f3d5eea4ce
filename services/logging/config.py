"""Configuration of the logging service, read once from INFERGRID_LOGGING_* variables."""

from __future__ import annotations

from dataclasses import dataclass, field

from libs.server import ServerConfig
from libs.telemetry import TelemetryConfig

ENV_PREFIX = "INFERGRID_LOGGING_"


@dataclass(frozen=True)
class LoggingServerConfig(ServerConfig):
    port: int = 50054


@dataclass(frozen=True)
class LoggingTelemetryConfig(TelemetryConfig):
    metrics_port: int = 9104


@dataclass(frozen=True)
class LoggingConfig:
    """Everything the logging service reads at start-up."""

    server: LoggingServerConfig = field(default_factory=LoggingServerConfig)
    telemetry: LoggingTelemetryConfig = field(default_factory=LoggingTelemetryConfig)
