"""With Redis unreachable the rate limiter charges this replica's local share of the tier: never unlimited."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from stack.ports import find_free_ports
from tests.integration.edge.conftest import EdgeStack, _spawn, _wait_serving

pytestmark = pytest.mark.integration


def test_rate_limits_fall_back_to_the_local_share_when_redis_is_down(
    edge_stack: EdgeStack, tmp_path: Path
) -> None:
    port, dead_redis = find_free_ports("127.0.0.1", 2)
    edge = _spawn(
        "services.edge",
        {
            "INFERGRID_EDGE_PORT": str(port),
            "INFERGRID_EDGE_PLATFORM_FILE": str(edge_stack.platform_file),
            "INFERGRID_EDGE_REDIS_URL": f"redis://127.0.0.1:{dead_redis}/0",
            "INFERGRID_EDGE_REDIS_TIMEOUT_MS": "100",
            "INFERGRID_EDGE_METRICS_PORT": "0",
            "INFERGRID_EDGE_DRAIN_SECONDS": "0",
            "INFERGRID_EDGE_REPLICAS": "1",
        },
        tmp_path / "edge-no-redis.log",
        port,
    )
    try:
        _wait_serving(edge)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            request = rls_pb2.RateLimitRequest(
                domain="infergrid",
                descriptors=[
                    ratelimit_pb2.RateLimitDescriptor(
                        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="tenant", value="limited")]
                    )
                ],
            )
            answers = [stub.ShouldRateLimit(request, timeout=5).overall_code for _ in range(10)]
    finally:
        edge.stop()

    # Tier `small`: 1/s, burst 5 — one replica's share is the whole tier: 5 pass, the rest are refused.
    ok = rls_pb2.RateLimitResponse.OK
    assert answers[:5] == [ok] * 5
    assert rls_pb2.RateLimitResponse.OVER_LIMIT in answers[5:]
    assert "rate-limit store unavailable" in edge.log_text()
