"""The feature service's metrics (the server's; the stream ingester, its own process, keeps its two in
ingest_stream.py so that the server does not export a consumer lag).

Backend latency is named after OpenTelemetry's database conventions:
`db_client_operation_duration_seconds` is OpenTelemetry's `db.client.operation.duration` in Prometheus
form (seconds; `db.system.name` and `db.operation.name` as labels): one histogram for Redis (the cache)
and Cassandra (the store), so one query compares them. Children are bound once per operation.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from libs.metrics import LabelCache

DB_CLIENT_DURATION = Histogram(
    "db_client_operation_duration_seconds",
    "Duration of database client operations (OpenTelemetry db.client.operation.duration), by system and "
    "operation.",
    ["db_system_name", "db_operation_name"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

# db_duration(system, operation): the bound child for `system` ("redis", "cassandra") and `operation`
# (e.g. "MGET", "read").
db_duration = LabelCache(DB_CLIENT_DURATION)


REDIS_MGET = db_duration("redis", "MGET")
REDIS_SET = db_duration("redis", "SET")
REDIS_DEL = db_duration("redis", "DEL")

CASSANDRA_SECONDS = Histogram(
    "infergrid_features_cassandra_seconds",
    "Latency of Cassandra calls made by the online store.",
    ["op"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
cassandra_seconds = LabelCache(CASSANDRA_SECONDS)
ROWS_READ = Counter("infergrid_features_rows_read_total", "Entity rows read from Cassandra.", ["view"])
ROWS_WRITTEN = Counter("infergrid_features_rows_written_total", "Entity rows written to Cassandra.", ["view"])
CACHE_LOOKUPS = Counter(
    "infergrid_features_cache_lookups_total",
    "Entity look-ups in the cache by result (hit, negative hit, miss, error).",
    ["result"],
)
ENTITY_ROWS = Counter("infergrid_features_entity_rows_total", "Entity rows requested, by view.", ["view"])
STALE_READS = Counter(
    "infergrid_features_stale_reads_total", "Reads answered from the cache alone while the store was down."
)
