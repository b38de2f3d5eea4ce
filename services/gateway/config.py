"""Configuration of the gateway service, read once from INFERGRID_GATEWAY_* variables."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from libs.config import Bounded, secret, section, setting, url_with_credentials
from libs.discovery import TargetError, parse_targets
from libs.inference_log import InferenceLogConfig
from libs.kafka import KafkaConfig
from libs.server import TRANSPORTS, ServerConfig
from libs.telemetry import TelemetryConfig

ENV_PREFIX = "INFERGRID_GATEWAY_"


@dataclass(frozen=True)
class GatewayServerConfig(ServerConfig):
    port: int = 50051
    # "aio" or "threaded" (libs/server.py); threaded here: ~30 % less CPU per Predict at concurrency 32.
    transport: str = setting("threaded", choices=TRANSPORTS)
    # Mutual TLS on the port (libs/mtls.py): the mesh CA, and the gateway's certificate and key. With
    # them set only Envoy (its mesh client certificate) is admitted; all three or none.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # A plaintext port for gRPC health checks (kubelet probes cannot present a client certificate);
    # PredictionService refuses every call that arrives on it. 0: none.
    health_port: int = setting(0, minimum=0, maximum=65535)

    def __post_init__(self) -> None:
        super().__post_init__()
        tls = (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        if any(tls) and not all(tls):
            raise ValueError("tls_ca_file, tls_cert_file and tls_key_file: set all three or none")

    @property
    def mesh(self) -> bool:
        """True when the port requires Envoy's mesh client certificate."""
        return self.tls_ca_file is not None


@dataclass(frozen=True)
class ModelsConfig:
    """Where the served models are described and how their traffic is split."""

    # Folder of input layouts, `<model>.json` each: the model's FP32 input columns in order, each from the
    # request or a feature view, with its default (deploy/local/input-layouts). Unset: no models.
    input_layouts: Path | None = None
    # How often the served versions, readiness and max_batch_size are re-read from the inference service.
    model_facts_interval_s: float = 5.0
    # The platform config (`models.<name>.versions`, shadow, sticky_key), watched for changes.
    # Unset: every model is served at its highest known version.
    platform_file: Path | None = None
    platform_poll_interval_s: float = 1.0


@dataclass(frozen=True)
class UpstreamConfig(Bounded):
    """The feature and inference services and how the gateway treats them."""

    # Discovery targets (libs/discovery.py): host:port, a DNS name or dns:///name:port (every A record:
    # a headless Service's pods), file:<json> (a supervisor's list of READY replicas), comma-separated.
    # The gateway keeps a channel per endpoint and spreads calls over all of them.
    features_target: str = "127.0.0.1:50052"
    inference_target: str = "127.0.0.1:8001"
    # How often the targets are re-resolved (new replicas get traffic, removed ones drain).
    discovery_interval_s: float = setting(1.0, positive=True)
    # Per call; the inbound deadline lowers them. Features are optional (defaults serve), so their
    # budget is short: a slow feature service degrades answers instead of delaying them.
    features_timeout_s: float = setting(0.1, positive=True)
    inference_timeout_s: float = setting(0.5, positive=True)
    # Used when the caller sends no deadline.
    request_timeout_s: float = setting(1.0, positive=True)
    # Attempts per call (gRPC retries UNAVAILABLE with jittered backoff; both calls are reads).
    features_max_attempts: int = setting(2, minimum=1)
    inference_max_attempts: int = setting(2, minimum=1)
    # Batches go to inference as messages on one long-lived ModelStreamInfer stream (cheaper per batch
    # on both sides than a unary ModelInfer call); false: one unary call per batch.
    inference_streaming: bool = True
    # A stream whose oldest unanswered batch is this far past its deadline is hung: its pending batches
    # fail UNAVAILABLE (retried on another replica), the replica is ejected and the stream reopened.
    inference_hang_margin_s: float = setting(1.0, positive=True)
    # Circuit breakers: open after this many consecutive failed calls, probe after reset_s.
    breaker_failures: int = 5
    breaker_reset_s: float = setting(2.0, positive=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("features_target", "inference_target"):
            try:
                parse_targets(getattr(self, name))
            except TargetError as exc:
                raise ValueError(f"{name}: {exc}") from None


@dataclass(frozen=True)
class BatchingConfig(Bounded):
    """Micro-batching of concurrent rows toward the feature and inference services (per model)."""

    # A batch goes out when it holds this many rows, or when its first row has waited this long
    # (0: the event loop's next turn) and fewer than max_concurrent_batches calls of the model are
    # running; while that many run, arriving rows wait and go together as soon as one returns.
    # One in flight makes the biggest batches, and the most requests per second on a shared core
    # (figures: bench/results/code-figures.md).
    max_batch_rows: int = setting(256, minimum=1)
    max_batch_delay_s: float = setting(0.0, minimum=0)
    max_concurrent_batches: int = setting(1, minimum=1)
    # Load shedding: rows waiting for or in a batch; beyond it RESOURCE_EXHAUSTED.
    max_pending_rows: int = setting(4096, minimum=1)
    # Rows being predicted in this process (all RPCs); beyond it RESOURCE_EXHAUSTED.
    max_in_flight_rows: int = setting(4096, minimum=1)
    # Rows in one PredictBatch call.
    max_batch_request_rows: int = setting(1000, minimum=1)
    # Rows one tenant may have in flight; 0: half of max_in_flight_rows (per-tenant load shedding).
    max_tenant_in_flight_rows: int = setting(0, minimum=0)
    # Serialized bytes of one row (its request id, entities and features): its inference-log record
    # must fit Kafka's message limit (1 MiB by default) with the features and outputs added.
    max_row_bytes: int = setting(64 * 1024, minimum=1)


class _RedisUser:
    """A section with `<_redis>url`, `<_redis>username` and `<_redis>password` fields: its Redis and ACL user."""

    _redis: ClassVar[str]

    def redis_client_url(self) -> str:
        """The Redis URL with the credentials in it, for the client only (never log it)."""
        url, user, password = (getattr(self, self._redis + f) for f in ("url", "username", "password"))
        return url_with_credentials(url, user, password)


@dataclass(frozen=True)
class ResponseCacheConfig(_RedisUser):
    """The optional Redis response cache (keyed by model, version and the request's inputs)."""

    _redis = "response_cache_redis_"

    response_cache_enabled: bool = False
    response_cache_redis_url: str = "redis://127.0.0.1:6379/0"
    # The cache's Redis ACL user and its password (..._PASSWORD_FILE: a file holding it); empty: no AUTH.
    response_cache_redis_username: str = ""
    response_cache_redis_password: str = secret("")
    response_cache_ttl_s: float = 5.0
    response_cache_key_prefix: str = "igw:"
    # Per Redis command; a slow or absent Redis is a miss, never an error.
    response_cache_timeout_s: float = 0.02


@dataclass(frozen=True)
class AdmissionConfig(Bounded, _RedisUser):
    """API keys and rate limits, checked here when the platform says `admission: {placement: gateway}`."""

    _redis = "admission_redis_"

    # The hashed key file; "" uses the platform's `api_keys_file`, relative to the platform file.
    admission_keys_file: str = ""
    admission_keys_poll_s: float = 1.0
    # The rate limiter's Redis (the edge's buckets: same keys, same semantics). Its own Redis (or db)
    # with maxmemory-policy noeviction: a cache's eviction must never erase a bucket (stack/redis.py).
    admission_redis_url: str = "redis://127.0.0.1:6379/0"
    # The rate limiter's Redis ACL user and its password (..._PASSWORD_FILE: a file holding it); empty: no AUTH.
    admission_redis_username: str = ""
    admission_redis_password: str = secret("")
    # Per lease round trip; past it the local fallback bucket answers (see libs/admission.py).
    admission_redis_timeout_s: float = setting(0.2, positive=True)
    admission_key_prefix: str = "infergrid:rl"
    # A lease holds about this many seconds of a tier's rate; unspent tokens lapse after the TTL.
    admission_lease_s: float = setting(0.05, positive=True)
    admission_lease_ttl_s: float = setting(1.0, positive=True)
    # After a Redis failure, the local bucket (this replica's share of the tier) answers for this long
    # before Redis is tried again.
    admission_fail_open_s: float = 1.0
    # Gateway replicas sharing the tiers: the local fallback allows 1/replicas of a tier's rate.
    # 0: the number of entries in the platform's gateway.endpoints.
    admission_replicas: int = setting(0, minimum=0)


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway service reads at start-up."""

    server: GatewayServerConfig = field(default_factory=GatewayServerConfig)
    telemetry: TelemetryConfig = section(TelemetryConfig, metrics_port=9101)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    cache: ResponseCacheConfig = field(default_factory=ResponseCacheConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    inference_log: InferenceLogConfig = field(default_factory=InferenceLogConfig)
    # Off: no inference-log records are published (tests, local experiments).
    inference_log_enabled: bool = True


def per_process(config: GatewayConfig, worker: str | None) -> GatewayConfig:
    """The config of this process: an SO_REUSEPORT worker gets its own spool folder (a spool is locked by
    its producer)."""
    if worker is None:
        return config
    log_config = config.inference_log
    spool = log_config.inference_log_spool_dir / f"worker-{worker}"
    return dataclasses.replace(
        config, inference_log=dataclasses.replace(log_config, inference_log_spool_dir=spool)
    )
