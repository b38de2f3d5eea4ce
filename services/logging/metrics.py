"""Prometheus metrics of the logging service."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECORDS = Counter(
    "infergrid_logging_records",
    "Inference-log messages consumed, by outcome (written to the sinks, dead_lettered).",
    ["outcome"],
)
CONSUMER_LAG = Gauge(
    "infergrid_logging_consumer_lag",
    "Messages in the inference-log topic not yet consumed, summed over the assigned partitions.",
)
BATCH_SIZE = Histogram(
    "infergrid_logging_batch_records",
    "Records per consumer batch.",
    buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000),
)
SINK_SECONDS = Histogram(
    "infergrid_logging_sink_write_seconds",
    "Time to write one batch to a sink.",
    ["sink"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SINK_ERRORS = Counter("infergrid_logging_sink_errors", "Failed sink writes (retried).", ["sink"])
COMMITS = Counter("infergrid_logging_commits", "Offset commits by result.", ["result"])
LAKE_FILES = Counter("infergrid_logging_lake_files", "Parquet files written to the data lake.")
REBALANCES = Counter("infergrid_logging_rebalances", "Partitions assigned or revoked.", ["event"])

for _outcome in ("written", "dead_lettered"):
    RECORDS.labels(_outcome)
for _sink in ("cassandra", "parquet"):
    SINK_ERRORS.labels(_sink)
for _result in ("ok", "failed"):
    COMMITS.labels(_result)
