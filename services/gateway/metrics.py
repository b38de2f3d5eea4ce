"""The gateway's Prometheus metrics (`infergrid_gateway_*`), with label children bound once."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from libs.metrics import LabelCache

REQUESTS = Counter(
    "infergrid_gateway_requests_total",
    "Predicted rows, by model, version and gRPC status (the autoscaler's requests-per-second signal).",
    ["model", "version", "status"],
)
LATENCY = Histogram(
    "infergrid_gateway_request_latency_seconds",
    "Time from receiving a row to its answer, by model.",
    ["model"],
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
BATCH_SIZE = Histogram(
    "infergrid_gateway_batch_rows",
    "Rows per batched call toward a dependency (features: one call per batch; inference: per version).",
    ["target"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
DEGRADED = Counter(
    "infergrid_gateway_degraded_total",
    "Rows answered with at least one default feature, by model.",
    ["model"],
)
SHADOW = Counter(
    "infergrid_gateway_shadow_total",
    "Shadow predictions, by model, shadow version and outcome (ok or the gRPC status).",
    ["model", "version", "status"],
)
IN_FLIGHT = Gauge(
    "infergrid_gateway_in_flight_rows",
    "Rows being predicted now (the queue depth).",
    multiprocess_mode="livesum",
)
QUEUED = Gauge(
    "infergrid_gateway_batcher_pending_rows",
    "Rows waiting for or in a batch (toward features and inference).",
    ["target"],
    multiprocess_mode="livesum",
)
ROUTE_SHARE = Gauge(
    "infergrid_gateway_route_share_ratio",
    "The traffic split the gateway applies now, from the platform config: role primary, each version's "
    "share of its model's requests (0 once no longer routed); role shadow, 1 for the model's shadow version.",
    ["model", "version", "role"],
    multiprocess_mode="livemax",
)
SHED = Counter("infergrid_gateway_shed_total", "Rows refused with RESOURCE_EXHAUSTED (load shedding).")
LOG_WRITE_FAILED = Counter(
    "infergrid_gateway_log_write_failures_total",
    "Inference-log records the disk log refused (disk full): their rows failed UNAVAILABLE.",
)
CACHE = Counter("infergrid_gateway_response_cache_total", "Response cache look-ups, by result.", ["result"])
# One histogram for the stages of a prediction, so a dashboard stacks them: `admission` (keys, tenant,
# rate limit; per call), `features` and `inference` (per batch: every row of a batch waits the same
# time), `publish` (the inference-log record written ahead to the spool; per row).
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 1.0)
STAGE = Histogram(
    "infergrid_gateway_stage_duration_seconds",
    "Time spent in one stage of a prediction (admission per call; features and inference per batch; "
    "publish per row).",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
ADMISSION_STAGE = STAGE.labels("admission")
FEATURES_STAGE = STAGE.labels("features")
INFERENCE_STAGE = STAGE.labels("inference")
PUBLISH_STAGE = STAGE.labels("publish")
FEATURE_ERRORS = Counter(
    "infergrid_gateway_feature_fetch_failures_total",
    "Feature fetches that failed (defaults served), by reason.",
    ["reason"],
)

PLACEMENT_DISAGREEMENTS = Counter(
    "infergrid_gateway_placement_disagreements_total",
    "Calls refused because Envoy's admission placement differs from the gateway's",
)
FAILOVERS = Counter(
    "infergrid_gateway_inference_failovers_total",
    "Inference batches served by another pool than the model's most preferred one, by why it did not serve.",
    ["model", "from_pool", "to_pool", "reason"],
)


class GatewayMetrics:
    """Cached label children: a label lookup per request is the costly part of a metric update."""

    def __init__(self) -> None:
        # request(model, version, status), latency(model), degraded(model): the bound children.
        self.request = LabelCache(REQUESTS)
        self.latency = LabelCache(LATENCY)
        self.degraded = LabelCache(DEGRADED)
        self.features_batch = BATCH_SIZE.labels("features")
        self.inference_batch = BATCH_SIZE.labels("inference")
