"""Per model-version Prometheus metrics and the counters behind the ModelStatistics RPC.

Metric children are bound once per model version, so the hot path pays no label look-ups.
`infergrid_inference_queue_depth` is the autoscaling signal (requests waiting for a batch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from libs.metrics import LabelCache

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_LABELS = ("model", "version")

REQUESTS = Counter(
    "infergrid_inference_requests_total", "Inference requests received per model version.", _LABELS
)
FAILURES = Counter(
    "infergrid_inference_failures_total",
    "Inference requests that failed, by reason (invalid, queue_full, timeout, backend, cancelled, unavailable).",
    (*_LABELS, "reason"),
)
REQUEST_SECONDS = Histogram(
    "infergrid_inference_request_seconds",
    "Time from a request entering the model's queue to its result.",
    _LABELS,
    buckets=_LATENCY_BUCKETS,
)
QUEUE_SECONDS = Histogram(
    "infergrid_inference_queue_seconds",
    "Time a request waited in the queue before its batch started.",
    _LABELS,
    buckets=_LATENCY_BUCKETS,
)
COMPUTE_SECONDS = Histogram(
    "infergrid_inference_compute_seconds",
    "Time to execute one batch (input assembly, model, output split).",
    _LABELS,
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "infergrid_inference_batch_size",
    "Rows per executed batch (1 when batching is off and requests carry one row).",
    _LABELS,
    buckets=_BATCH_BUCKETS,
)
ROWS = Counter("infergrid_inference_rows_total", "Rows (batch items) inferred.", _LABELS)
QUEUE_DEPTH = Gauge(
    "infergrid_inference_queue_depth",
    "Requests waiting in the model version's queue (the autoscaling signal).",
    _LABELS,
    multiprocess_mode="livesum",
)
QUEUE_DELAY = Gauge(
    "infergrid_inference_queue_delay_seconds",
    "The batcher's current queue delay (adapted when the model has a p99 target, else the configured one).",
    _LABELS,
    multiprocess_mode="max",
)
BATCH_CAP = Gauge(
    "infergrid_inference_batch_cap",
    "The batcher's current batch-size cap in rows (adapted when the model has a p99 target).",
    _LABELS,
    multiprocess_mode="max",
)
MODEL_READY = Gauge(
    "infergrid_inference_model_ready",
    "1 while the model version is loaded and serving.",
    _LABELS,
    multiprocess_mode="livemax",
)


@dataclass
class Duration:
    """A count and a total in nanoseconds (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionStatistics(BatchDurations):
    """What ModelStatistics reports for one version (compute_* per request); updated on the event loop only."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    batches: dict[int, BatchDurations] = field(default_factory=dict)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0

    def record_batch(self, rows: int, requests: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """Adds one executed batch of `rows` rows from `requests` requests."""
        self.inference_count += rows
        self.execution_count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000
        # Triton counts compute per request in inference_stats and per execution in batch_stats.
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        batch = self.batches.setdefault(rows, BatchDurations())
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)


class VersionMetrics:
    """Prometheus children and statistics of one model version."""

    __slots__ = (
        "_failures",
        "_labels",
        "batch_cap",
        "batch_size",
        "compute",
        "queue_delay",
        "queue_depth",
        "queue_seconds",
        "ready",
        "request_seconds",
        "requests",
        "rows",
        "stats",
    )

    def __init__(self, model: str, version: int) -> None:
        self._labels = (model, str(version))
        self.requests = REQUESTS.labels(*self._labels)
        self.request_seconds = REQUEST_SECONDS.labels(*self._labels)
        self.queue_seconds = QUEUE_SECONDS.labels(*self._labels)
        self.compute = COMPUTE_SECONDS.labels(*self._labels)
        self.batch_size = BATCH_SIZE.labels(*self._labels)
        self.rows = ROWS.labels(*self._labels)
        self.queue_depth = QUEUE_DEPTH.labels(*self._labels)
        self.queue_delay = QUEUE_DELAY.labels(*self._labels)
        self.batch_cap = BATCH_CAP.labels(*self._labels)
        self.ready = MODEL_READY.labels(*self._labels)
        self._failures = LabelCache(FAILURES, *self._labels)
        self.stats = VersionStatistics()

    def failed(self, reason: str, elapsed_ns: int) -> None:
        self._failures(reason).inc()
        self.stats.fail.add(elapsed_ns)
