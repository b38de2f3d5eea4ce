"""The console's settings, from INFERGRID_CONSOLE_* variables."""

from __future__ import annotations

from collections.abc import Mapping
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

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ConsoleConfig:
        """Reads INFERGRID_CONSOLE_{HOST,PORT,PROMETHEUS_URL,JAEGER_URL,FEATURES_TARGET,TIMEOUT_S}.

        Raises:
            ValueError: a malformed number, naming the variable.
        """
        values: dict[str, object] = {}
        for name, kind in (("host", str), ("port", int), ("prometheus_url", str), ("jaeger_url", str),
                           ("features_target", str), ("timeout_s", float)):  # fmt: skip
            variable = f"{ENV_PREFIX}{name.upper()}"
            if variable in env:
                try:
                    values[name] = kind(env[variable])
                except ValueError:
                    raise ValueError(f"{variable}: not a {kind.__name__}: {env[variable]!r}") from None
        return cls(**values)  # type: ignore[arg-type]
