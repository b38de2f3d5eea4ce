"""Configuration of the logging service, read once from INFERGRID_LOGGING_* variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from libs.cassandra import CassandraConfig
from libs.config import Bounded, secret, section, setting
from libs.kafka import KafkaConfig
from libs.server import ServerConfig
from libs.telemetry import TelemetryConfig

ENV_PREFIX = "INFERGRID_LOGGING_"


@dataclass(frozen=True)
class LoggingKafkaConfig(KafkaConfig):
    kafka_client_id: str = "infergrid-logging"


@dataclass(frozen=True)
class PipelineConfig(Bounded):
    """The consumer: topics, batching, the data lake and its roll policy."""

    # False: serve the query API only (no consumer).
    consume: bool = True
    topic: str = "infergrid.inference-log.v1"
    dead_letter_topic: str = "infergrid.inference-log.v1.dlq"
    consumer_group: str = "infergrid-logging"
    # Create the topics at start-up when missing (local stack); clusters manage topics elsewhere.
    create_topics: bool = True
    topic_partitions: int = 6
    topic_replication: int = 1
    # The topics' min.insync.replicas (with acks=all, a write needs this many replicas); 0: the broker's.
    topic_min_insync_replicas: int = 0
    # Records per consumer batch, and how long a batch waits to fill.
    batch_max_records: int = setting(5000, minimum=1)
    batch_wait_seconds: float = 0.2
    # Batches whose Cassandra write may be under way at once while the next is fetched and validated; they
    # complete in order either way, so offsets still only advance over records the store holds.
    batch_writes_in_flight: int = setting(1, minimum=1, maximum=16)
    lake_dir: Path = Path(".state/logging/lake")
    # The lake's buffer is written to files (and offsets committed) at this size or age.
    lake_roll_bytes: int = 64 * 1024 * 1024
    lake_roll_seconds: float = 30.0
    # Cassandra rows expire after this many seconds; 0 keeps them.
    record_ttl_seconds: int = 0
    # Kafka: the group drops a consumer that does not poll for this long (ms).
    max_poll_interval_ms: int = 300_000
    session_timeout_ms: int = 10_000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.topic == self.dead_letter_topic:
            raise ValueError("dead_letter_topic must differ from topic")
        if not 0 <= self.topic_min_insync_replicas <= self.topic_replication:
            raise ValueError(
                f"topic_min_insync_replicas must be 0..topic_replication ({self.topic_replication}), "
                f"got {self.topic_min_insync_replicas}"
            )


@dataclass(frozen=True)
class QueryConfig:
    """Who may call the query API (services/logging/access.py): tenants' API keys and the operator."""

    # The platform file whose tenants may read their own records with their API keys, as the gateway
    # and the edge check them. Unset: no tenant key is accepted (the admin token only).
    query_platform_file: Path | None = None
    # The hashed API-key file; unset: the platform's `api_keys_file`, next to the platform file.
    query_keys_file: Path | None = None
    # How often both files are re-read (a key removed from the file is refused from then on).
    query_keys_poll_s: float = 1.0
    # The operator's credential: every tenant's records, and GetStats. Unset: no operator; with no
    # platform file either, every call is UNAUTHENTICATED.
    query_admin_token: str = secret("")


@dataclass(frozen=True)
class LoggingConfig:
    """Everything the logging service reads at start-up."""

    server: ServerConfig = section(ServerConfig, port=50054)
    telemetry: TelemetryConfig = section(TelemetryConfig, metrics_port=9104)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    kafka: LoggingKafkaConfig = field(default_factory=LoggingKafkaConfig)
    cassandra: CassandraConfig = field(default_factory=CassandraConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
