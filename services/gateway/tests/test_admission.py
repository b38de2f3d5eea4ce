"""Admission in the gateway: keys, tenants' models, rate limits (fake limiter), fail-open, and over gRPC."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from libs.apikeys import add_key, load_keys
from libs.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from libs.platform import parse_platform
from libs.testing import FakeLimiter
from services.gateway.admission import Admission
from services.gateway.config import AdmissionConfig, GatewayConfig, GatewayServerConfig, ModelsConfig
from services.gateway.server import create_server

PLATFORM = """
admission: {placement: gateway}
rate_limit_tiers:
  free: {requests_per_second: 2, burst: 3}
  model_tier: {requests_per_second: 1, burst: 1}
tenants:
  demo: {tier: free, models: [fraud]}
  ghost_free: {tier: free, models: ["*"]}
models:
  fraud: {versions: [{version: "1", weight: 1}], rate_limit_tier: model_tier}
"""


def _admission(tmp_path: Path, limiter: FakeLimiter, clock: list[float] | None = None) -> Admission:
    platform = parse_platform(PLATFORM)
    keys_file = tmp_path / "keys.yaml"
    add_key(keys_file, "demo", "k-demo", "ig_demo")
    add_key(keys_file, "nobody", "k-orphan", "ig_orphan")
    now = clock if clock is not None else [0.0]
    admission = Admission(lambda: platform, limiter, fail_open_s=1.0, clock=lambda: now[0])
    admission.set_keys(load_keys(keys_file))
    return admission


async def test_a_valid_key_admits_its_tenant_and_charges_tenant_and_model_buckets(tmp_path: Path) -> None:
    limiter = FakeLimiter()
    admission = _admission(tmp_path, limiter)
    assert await admission.admit({"x-api-key": "ig_demo"}, "fraud") == "demo"
    assert await admission.admit({"authorization": "Bearer ig_demo"}, "fraud") == "demo"
    (tenant_bucket, model_bucket) = limiter.calls[0]
    assert tenant_bucket.key == "infergrid:rl:infergrid:{demo}" and tenant_bucket.burst == 3
    assert model_bucket.key == "infergrid:rl:infergrid:{demo}:model:fraud" and model_bucket.burst == 1


@pytest.mark.parametrize(
    ("headers", "model", "error", "text"),
    [
        ({}, "fraud", Unauthenticated, "missing API key"),
        ({"x-api-key": "ig_wrong"}, "fraud", Unauthenticated, "invalid API key"),
        ({"authorization": "Basic ig_demo"}, "fraud", Unauthenticated, "missing API key"),
        ({"x-api-key": "ig_demo"}, "ranker", PermissionDenied, "may not call model 'ranker'"),
        ({"x-api-key": "ig_orphan"}, "fraud", PermissionDenied, "'nobody' of this key is not configured"),
    ],
)
async def test_refusals_name_the_problem_and_never_charge(
    tmp_path: Path, headers: dict[str, str], model: str, error: type[Exception], text: str
) -> None:
    limiter = FakeLimiter()
    with pytest.raises(error, match=text):
        await _admission(tmp_path, limiter).admit(headers, model)
    assert limiter.calls == []


async def test_over_the_limit_is_resource_exhausted_with_retry_after(tmp_path: Path) -> None:
    limiter = FakeLimiter()
    limiter.allow = False
    limiter.wait_s = 2.5
    with pytest.raises(ResourceExhausted, match="retry after 3 s") as caught:
        await _admission(tmp_path, limiter).admit({"x-api-key": "ig_demo"}, "fraud")
    assert caught.value.trailing_metadata == (("retry-after", "3"),)


async def test_a_store_failure_fails_open_and_rests_redis_for_a_while(tmp_path: Path) -> None:
    limiter, now = FakeLimiter(), [100.0]
    admission = _admission(tmp_path, limiter, now)
    limiter.fail = True
    assert await admission.admit({"x-api-key": "ig_demo"}, "fraud") == "demo"
    limiter.fail, limiter.allow = False, False
    # Within fail_open_s Redis is not asked: the request passes without a limit.
    assert await admission.admit({"x-api-key": "ig_demo"}, "fraud") == "demo"
    assert limiter.calls == []
    now[0] += 1.5
    with pytest.raises(ResourceExhausted):
        await admission.admit({"x-api-key": "ig_demo"}, "fraud")
    # Authentication never fails open.
    limiter.fail = True
    with pytest.raises(Unauthenticated):
        await admission.admit({"x-api-key": "ig_wrong"}, "fraud")


async def test_the_gateway_admits_over_grpc_and_ignores_forged_identity_headers(tmp_path: Path) -> None:
    platform = tmp_path / "platform.yaml"
    platform.write_text(PLATFORM)
    keys_file = tmp_path / "keys.yaml"
    add_key(keys_file, "demo", "k-demo", "ig_demo")
    config = GatewayConfig(
        server=GatewayServerConfig(port=0),
        models=ModelsConfig(platform_file=platform),
        # Nothing listens there: rate limits fail open, keys are still checked.
        admission=AdmissionConfig(admission_redis_url="redis://127.0.0.1:9/0", admission_redis_timeout_s=0.2),
        inference_log_enabled=False,
    )
    server = await create_server(config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = gateway_pb2_grpc.PredictionServiceStub(channel)
            request = gateway_pb2.PredictRequest(model="fraud")
            forged = (("x-infergrid-tenant", "demo"), ("x-infergrid-model", "fraud"))
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.Predict(request, metadata=forged, timeout=5)
            assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.Predict(
                    gateway_pb2.PredictRequest(model="x"), metadata=(("x-api-key", "ig_demo"),)
                )
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # Admitted: the request reaches the predictor, which knows no model `fraud` here.
            with pytest.raises(grpc.aio.AioRpcError) as admitted:
                await stub.Predict(request, metadata=(("x-api-key", "ig_demo"),), timeout=5)
            assert admitted.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(0, 0.5)
