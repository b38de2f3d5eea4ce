"""The feature service's backend latency metrics, named after OpenTelemetry's database conventions.

`db_client_operation_duration_seconds` is OpenTelemetry's `db.client.operation.duration` in Prometheus
form (seconds; `db.system.name` and `db.operation.name` as labels): one histogram for Redis (the cache)
and Cassandra (the store), so one query compares them. Children are bound once per operation.
"""

from __future__ import annotations

from prometheus_client import Histogram

DB_CLIENT_DURATION = Histogram(
    "db_client_operation_duration_seconds",
    "Duration of database client operations (OpenTelemetry db.client.operation.duration), by system and "
    "operation.",
    ["db_system_name", "db_operation_name"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

_bound: dict[tuple[str, str], Histogram] = {}


def db_duration(system: str, operation: str) -> Histogram:
    """The bound child for `system` ("redis", "cassandra") and `operation` (e.g. "MGET", "read")."""
    child = _bound.get((system, operation))
    if child is None:
        child = _bound[(system, operation)] = DB_CLIENT_DURATION.labels(system, operation)
    return child


REDIS_MGET = db_duration("redis", "MGET")
REDIS_SET = db_duration("redis", "SET")
REDIS_DEL = db_duration("redis", "DEL")
