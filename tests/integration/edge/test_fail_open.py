"""With Redis unreachable the rate limiter lets requests through (fail open); authentication still decides."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from stack.ports import find_free_ports
from tests.integration.edge.conftest import EdgeStack, _spawn, _wait_serving

pytestmark = pytest.mark.integration


def test_rate_limits_fail_open_when_redis_is_down(edge_stack: EdgeStack, tmp_path: Path) -> None:
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

    assert answers == [rls_pb2.RateLimitResponse.OK] * 10
    assert "fail open" in edge.log_text()
