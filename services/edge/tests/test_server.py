"""The edge servicers over a real gRPC channel: Check and ShouldRateLimit as Envoy calls them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.rpc import code_pb2

from libs.server import ServerConfig
from libs.testing import FakeLimiter
from services.edge.config import EdgeConfig, PolicyConfig
from services.edge.keys import add_key
from services.edge.server import create_server

PLATFORM = """
rate_limit_tiers:
  free: {requests_per_second: 2, burst: 3}
  model_tier: {requests_per_second: 1, burst: 1}
tenants: {demo: {tier: free, models: [fraud]}}
models:
  fraud: {versions: [{version: "1", weight: 1}], rate_limit_tier: model_tier}
  other: {versions: [{version: "1", weight: 1}]}
"""


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[tuple[Any, Any, FakeLimiter]]:
    """The edge server's ext_authz and rate-limit stubs, and the limiter behind it."""
    (tmp_path / "platform.yaml").write_text(PLATFORM)
    add_key(tmp_path / "keys.yaml", "demo", "demo", "ig_demo")
    limiter = FakeLimiter()
    config = EdgeConfig(
        server=ServerConfig(port=0, drain_seconds=0, grace_seconds=0),
        policy=PolicyConfig(platform_file=tmp_path / "platform.yaml", poll_seconds=0.05),
    )
    server = await create_server(config, limiter=limiter)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            authz = external_auth_pb2_grpc.AuthorizationStub(channel)
            yield authz, rls_pb2_grpc.RateLimitServiceStub(channel), limiter
    finally:
        await server.stop(0, 0)


def _check_request(headers: dict[str, str], model: str) -> external_auth_pb2.CheckRequest:
    body = b"\x0a" + bytes([len(model)]) + model.encode()
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        path="/infergrid.gateway.v1.PredictionService/Predict",
        headers=headers,
        raw_body=b"\x00" + len(body).to_bytes(4, "big") + body,
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


async def test_check_allows_with_identity_headers_and_strips_the_key(edge) -> None:  # type: ignore[no-untyped-def]
    stub, _, _ = edge

    ok = await stub.Check(_check_request({"x-api-key": "ig_demo"}, "fraud"))

    assert ok.status.code == code_pb2.OK
    headers = {h.header.key: h.header.value for h in ok.ok_response.headers}
    assert headers["x-infergrid-tenant"] == "demo"
    assert headers["x-infergrid-model"] == "fraud"
    assert {"x-api-key", "authorization"} <= set(ok.ok_response.headers_to_remove)


async def test_check_denies_with_401_and_403(edge) -> None:  # type: ignore[no-untyped-def]
    stub, _, _ = edge

    missing = await stub.Check(_check_request({}, "fraud"))
    forbidden = await stub.Check(_check_request({"x-api-key": "ig_demo"}, "other"))

    assert (missing.status.code, missing.denied_response.status.code) == (code_pb2.UNAUTHENTICATED, 401)
    assert (forbidden.status.code, forbidden.denied_response.status.code) == (code_pb2.PERMISSION_DENIED, 403)


def _rls_request(*descriptors: dict[str, str]) -> rls_pb2.RateLimitRequest:
    return rls_pb2.RateLimitRequest(
        domain="infergrid",
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in d.items()]
            )
            for d in descriptors
        ],
    )


async def test_rate_limit_maps_descriptors_to_tier_buckets(edge) -> None:  # type: ignore[no-untyped-def]
    _, stub, limiter = edge

    ok = await stub.ShouldRateLimit(
        _rls_request(
            {"tenant": "demo"}, {"tenant": "demo", "model": "fraud"}, {"tenant": "demo", "model": "other"}
        )
    )

    assert ok.overall_code == rls_pb2.RateLimitResponse.OK
    (buckets,) = limiter.calls
    assert [(b.requests_per_second, b.burst) for b in buckets] == [(2.0, 3), (1.0, 1)]
    assert buckets[0].key.endswith(":infergrid:{demo}")
    assert buckets[1].key.endswith(":infergrid:{demo}:model:fraud")
    assert len(ok.statuses) == 3  # one per descriptor, the unlimited one included


async def test_over_limit_carries_retry_after(edge) -> None:  # type: ignore[no-untyped-def]
    _, stub, limiter = edge
    limiter.allow = False

    over = await stub.ShouldRateLimit(_rls_request({"tenant": "demo"}))

    assert over.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
    assert over.statuses[0].code == rls_pb2.RateLimitResponse.OVER_LIMIT
    assert over.statuses[0].duration_until_reset.ToSeconds() == 2
    assert b"retry after 2 s" in over.raw_body
    assert {(h.key, h.value) for h in over.response_headers_to_add} == {("retry-after", "2")}


async def test_store_failure_fails_open(edge) -> None:  # type: ignore[no-untyped-def]
    _, stub, limiter = edge
    limiter.fail = True

    answer = await stub.ShouldRateLimit(_rls_request({"tenant": "demo"}))

    assert answer.overall_code == rls_pb2.RateLimitResponse.OK
