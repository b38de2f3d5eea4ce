"""Configuration of the features service, read once from INFERGRID_FEATURES_* variables."""

from __future__ import annotations

from dataclasses import dataclass, field

from libs.server import ServerConfig
from libs.telemetry import TelemetryConfig

ENV_PREFIX = "INFERGRID_FEATURES_"


@dataclass(frozen=True)
class FeaturesServerConfig(ServerConfig):
    port: int = 50052


@dataclass(frozen=True)
class FeaturesTelemetryConfig(TelemetryConfig):
    metrics_port: int = 9102


@dataclass(frozen=True)
class FeaturesConfig:
    """Everything the features service reads at start-up."""

    server: FeaturesServerConfig = field(default_factory=FeaturesServerConfig)
    telemetry: FeaturesTelemetryConfig = field(default_factory=FeaturesTelemetryConfig)
