"""The edge's Prometheus metrics (the shared gRPC server metrics come from libs/interceptors.py)."""

from __future__ import annotations

from prometheus_client import Counter

DECISIONS = Counter("infergrid_edge_authz_total", "Authorization decisions", ["result"])
LIMITS = Counter("infergrid_edge_ratelimit_total", "Rate-limit decisions", ["result"])
