"""Configuration of the xDS control plane, read once from INFERGRID_CONTROLPLANE_* variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from libs.config import Bounded, section, setting
from libs.discovery import TargetError, parse_targets
from libs.server import ServerConfig
from libs.telemetry import TelemetryConfig

ENV_PREFIX = "INFERGRID_CONTROLPLANE_"


@dataclass(frozen=True)
class EnvoySettings(Bounded):
    """Deployment wiring the platform file does not hold: where Envoy's helpers are, where it writes."""

    # The declarative platform config (listener, gateway upstream, tiers, tenants, models).
    platform_file: Path = Path("deploy/local/platform.yaml")
    # How often the platform file is checked for changes.
    platform_poll_seconds: float = setting(1.0, positive=True)
    # The descriptor set (protoc --include_imports) of the public API, for grpc_json_transcoder.
    descriptor_set: Path = Path("build/gen/descriptors.pb")
    # The edge service (ext_authz + rate-limit service): a discovery target (libs/discovery.py), e.g.
    # host:port, a headless Service's name (every pod), file:<json> or a comma-separated list.
    edge_address: str = "127.0.0.1:50060"
    # How often the edge's and the gateway's endpoints (the platform's gateway.endpoints) are re-resolved.
    endpoints_poll_seconds: float = setting(1.0, positive=True)
    # Envoy's wait for an authorization or rate-limit answer.
    edge_timeout_ms: int = 1000
    # Overrides the platform's listener port when non-zero (the stack's INFERGRID_ENVOY_PORT).
    listener_port: int = 0
    # Access log: "stdout", "" (off) or a file path; one JSON object per request.
    access_log: str = "stdout"
    # OTLP gRPC endpoint (host:port) Envoy sends its spans to; "" turns Envoy's tracing off.
    tracing_otlp_address: str = ""
    # The share of requests Envoy starts a trace for (0-100; its random_sampling). Envoy decides at the
    # edge and every service behind it follows the decision (W3C traceparent, ParentBased samplers), so
    # this one knob sets the tracing cost of the whole path: 100 for development (every request in
    # Jaeger), about 1 in production (bench/results: what each costs per request).
    tracing_sample_percent: float = setting(100.0, minimum=0, maximum=100)
    # Where a self-signed certificate is written when TLS is on without a certificate file.
    tls_dir: Path = Path(".state/controlplane/tls")
    # The Envoy → gateway mutual TLS (libs/mtls.py): a folder holding ca.crt, envoy.crt and envoy.key,
    # sent to Envoy over SDS (re-read with every snapshot). Unset: plaintext to the gateway.
    mesh_dir: Path | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            parse_targets(self.edge_address)
        except TargetError as exc:
            raise ValueError(f"edge_address: {exc}") from None


@dataclass(frozen=True)
class ControlPlaneConfig:
    """Everything the control plane reads at start-up."""

    # Envoy holds one ADS stream open for its whole life: do not wait for it on shutdown.
    server: ServerConfig = section(ServerConfig, port=18000, drain_seconds=0.5, grace_seconds=1.0)
    telemetry: TelemetryConfig = section(TelemetryConfig, metrics_port=9106)
    envoy: EnvoySettings = field(default_factory=EnvoySettings)
