"""Configuration of the features service, read once from INFERGRID_FEATURES_* variables."""

from __future__ import annotations

from dataclasses import dataclass, field

from libs.cassandra import CassandraConfig
from libs.config import Bounded, RedisClientConfig, section, setting
from libs.kafka import KafkaConfig
from libs.server import TRANSPORTS, ServerConfig
from libs.telemetry import TelemetryConfig

ENV_PREFIX = "INFERGRID_FEATURES_"


@dataclass(frozen=True)
class FeaturesServerConfig(ServerConfig):
    port: int = 50052
    # "aio" or "threaded" (libs/server.py); threaded here: a cache hit costs about half the CPU of grpc.aio.
    transport: str = setting("threaded", choices=TRANSPORTS)


@dataclass(frozen=True)
class CacheConfig(RedisClientConfig):
    """The Redis read-through cache in front of Cassandra."""

    # Off: every read goes to Cassandra.
    cache_enabled: bool = True
    # Upper bound on how long an entity's values stay cached; a view's TTL lowers it.
    cache_ttl_s: float = setting(300.0, positive=True)
    # How long "this entity has no values" is remembered (writes invalidate it at once).
    cache_negative_ttl_s: float = setting(30.0, positive=True)
    cache_key_prefix: str = "ifs:"
    # Per Redis command; a slow or absent Redis is a cache miss, never an error.
    cache_timeout_s: float = 0.1


@dataclass(frozen=True)
class StoreConfig(Bounded):
    """How the online store uses Cassandra (connection settings are in CassandraConfig)."""

    # Entities read per `IN (...)` query; a request for more is split into concurrent queries.
    store_read_chunk: int = setting(100, minimum=1, maximum=1000)
    # Values older than their view's TTL stay stored this long (served as EXPIRED), then Cassandra drops them.
    store_expired_retention_s: int = 86_400
    # Circuit breaker: open after this many consecutive failures, probe again after reset_s.
    store_breaker_failures: int = 5
    store_breaker_reset_s: float = 2.0
    # Attempts per Cassandra call (1: no retry); retries are budgeted.
    store_max_attempts: int = 2
    # The latest expiration time (seconds since the epoch) Cassandra accepts: 2038-01-19 unless every
    # node runs with `storage_compatibility_mode: NONE` (Cassandra 5; then up to 4294967294, 2106).
    # A value whose TTL would end later is stored without one (reads still apply the view's TTL).
    store_max_expiration_s: int = 2_147_483_646


@dataclass(frozen=True)
class LimitsConfig(Bounded):
    """Request size limits: larger requests are refused with INVALID_ARGUMENT."""

    max_entities_per_request: int = 1000
    max_features_per_request: int = 1000
    max_rows_per_write: int = 10_000
    # Writes with an event time more than this many seconds after the server's clock are refused
    # (a far-future event time would win over every later write of the feature, forever).
    max_event_time_skew_s: float = setting(300.0, minimum=0)
    # Writes with an event time before this (seconds since the epoch; 2000-01-01) are refused.
    min_event_time_s: int = 946_684_800
    # How often feature views are re-read from Cassandra (changes applied through other replicas).
    registry_refresh_s: float = 5.0


@dataclass(frozen=True)
class StreamConfig:
    """The streaming ingestion consumer (`python -m services.features.ingest_stream`)."""

    stream_topic: str = "infergrid.features.updates"
    stream_dead_letter_topic: str = "infergrid.features.updates.dlq"
    stream_group_id: str = "infergrid-features-ingest"
    stream_batch_size: int = 500
    stream_poll_timeout_s: float = 0.5
    # Prometheus /metrics of the consumer process (the server's METRICS_PORT is for the server); 0: off.
    stream_metrics_port: int = 9112


@dataclass(frozen=True)
class FeaturesConfig:
    """Everything the features service reads at start-up."""

    server: FeaturesServerConfig = field(default_factory=FeaturesServerConfig)
    telemetry: TelemetryConfig = section(TelemetryConfig, metrics_port=9102)
    cassandra: CassandraConfig = field(default_factory=CassandraConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
