"""The console's settings, from INFERGRID_CONSOLE_* variables."""

from __future__ import annotations

from dataclasses import dataclass

ENV_PREFIX = "INFERGRID_CONSOLE_"


@dataclass(frozen=True)
class ConsoleConfig:
    """Where the console listens and the public APIs it reads."""

    host: str = "127.0.0.1"
    port: int = 8090
    # Prometheus' HTTP API and Jaeger's query API (base URLs).
    prometheus_url: str = "http://127.0.0.1:9090"
    jaeger_url: str = "http://127.0.0.1:16686"
    # The feature service's gRPC API (host:port): its feature views (ListFeatureViews).
    features_target: str = "127.0.0.1:50052"
    timeout_s: float = 5.0
