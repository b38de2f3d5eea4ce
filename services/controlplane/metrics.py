"""The control plane's Prometheus metrics (the shared gRPC server metrics come from libs/interceptors.py)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

STREAMS = Gauge("infergrid_xds_streams", "Open ADS streams (connected Envoys)")
ANSWERS = Counter("infergrid_xds_answers_total", "ACKs and NACKs from Envoys", ["type", "result"])
SNAPSHOTS = Counter("infergrid_xds_snapshots_total", "Snapshots built from the platform config", ["result"])
NACKED = Gauge("infergrid_xds_last_answer_nack", "1 while the last answer for a type was a NACK", ["type"])
ENDPOINTS = Gauge("infergrid_xds_endpoints", "Endpoints served to Envoy over EDS, by cluster", ["cluster"])
ENDPOINT_CHANGES = Counter(
    "infergrid_xds_endpoint_changes_total", "Endpoint sets changed (EDS pushed), by cluster", ["cluster"]
)
