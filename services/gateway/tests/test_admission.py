"""Admission in the gateway: keys, tenants' models, per-row rate limits (fake limiter), the local fallback,
the edge identity only over Envoy's mTLS hop, placement disagreement, no platform, and over gRPC."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from libs.admission import RateLimits
from libs.apikeys import add_key, load_keys
from libs.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from libs.platform import PlatformConfig, parse_platform
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


def _admission(
    tmp_path: Path,
    limiter: FakeLimiter,
    clock: list[float] | None = None,
    *,
    placement: str = "gateway",
    mesh: bool = False,
    replicas: int = 1,
) -> Admission:
    platform = parse_platform(PLATFORM)
    keys_file = tmp_path / "keys.yaml"
    add_key(keys_file, "demo", "k-demo", "ig_demo")
    add_key(keys_file, "nobody", "k-orphan", "ig_orphan")
    now = clock if clock is not None else [0.0]
    limits = RateLimits(
        limiter,
        place="gateway",
        key_prefix="infergrid:rl",
        timeout_s=0.2,
        retry_store_after_s=1.0,
        replicas=lambda: replicas,
        clock=lambda: now[0],
    )
    admission = Admission(lambda: platform, placement, limits, mesh=mesh)
    admission.policy.set_keys(load_keys(keys_file))
    return admission


async def _tenant(admission: Admission, headers: dict[str, str], model: str, rows: int = 1) -> str:
    return (await admission.admit(headers, model, rows)).tenant


async def test_a_valid_key_admits_its_tenant_and_charges_tenant_and_model_buckets(tmp_path: Path) -> None:
    limiter = FakeLimiter()
    admission = _admission(tmp_path, limiter)
    assert await _tenant(admission, {"x-api-key": "ig_demo"}, "fraud") == "demo"
    assert await _tenant(admission, {"authorization": "Bearer ig_demo"}, "fraud") == "demo"
    (tenant_bucket, model_bucket) = limiter.calls[0]
    assert tenant_bucket.key == "infergrid:rl:infergrid:{demo}" and tenant_bucket.burst == 3
    assert model_bucket.key == "infergrid:rl:infergrid:{demo}:model:fraud" and model_bucket.burst == 1


async def test_a_batch_is_charged_one_unit_per_row(tmp_path: Path) -> None:
    limiter = FakeLimiter()
    await _admission(tmp_path, limiter).admit({"x-api-key": "ig_demo"}, "fraud", 1000)
    assert [b.cost for b in limiter.calls[0]] == [1000, 1000]


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


@pytest.mark.parametrize("placement", ["gateway", "edge"])
async def test_forged_identity_headers_are_never_believed_without_envoys_certificate(
    tmp_path: Path, placement: str
) -> None:
    forged = {"x-infergrid-tenant": "demo", "x-infergrid-model": "fraud", "x-infergrid-placement": placement}
    for mesh in (False, True):
        admission = _admission(tmp_path, FakeLimiter(), placement=placement, mesh=mesh)
        with pytest.raises(Unauthenticated):
            await admission.admit(forged, "fraud", via_envoy=False)


async def test_the_edge_identity_is_believed_over_envoys_mtls_hop_for_the_authorized_model(
    tmp_path: Path,
) -> None:
    limiter = FakeLimiter()
    admission = _admission(tmp_path, limiter, placement="edge", mesh=True)
    headers = {"x-infergrid-tenant": "demo", "x-infergrid-model": "fraud", "x-infergrid-placement": "edge"}
    assert (await admission.admit(headers, "fraud", via_envoy=True)).tenant == "demo"
    assert limiter.calls == []  # the edge's rate-limit filter charged it
    with pytest.raises(PermissionDenied):
        await admission.admit(headers, "ranker", via_envoy=True)
    with pytest.raises(PermissionDenied):  # a tenant the platform does not know
        await admission.admit({**headers, "x-infergrid-tenant": "ghost"}, "fraud", via_envoy=True)


@pytest.mark.parametrize(("mine", "envoys"), [("edge", "gateway"), ("gateway", "edge"), ("edge", "")])
async def test_a_placement_disagreement_refuses_every_call(tmp_path: Path, mine: str, envoys: str) -> None:
    admission = _admission(tmp_path, FakeLimiter(), placement=mine, mesh=True)
    headers = {"x-api-key": "ig_demo", "x-infergrid-tenant": "demo", "x-infergrid-model": "fraud"}
    if envoys:
        headers["x-infergrid-placement"] = envoys
    with pytest.raises(Unauthenticated, match="placement disagreement"):
        await admission.admit(headers, "fraud", via_envoy=True)


async def test_without_a_platform_nobody_is_admitted(tmp_path: Path) -> None:
    missing: list[PlatformConfig] = []
    admission = Admission(
        lambda: missing[0] if missing else None,
        "gateway",
        RateLimits(None, place="t", key_prefix="t", timeout_s=0.2, retry_store_after_s=1.0),
        mesh=False,
    )
    add_key(tmp_path / "keys.yaml", "demo", "k-demo", "ig_demo")
    admission.policy.set_keys(load_keys(tmp_path / "keys.yaml"))
    with pytest.raises(Unauthenticated, match="no platform"):
        await admission.admit({"x-api-key": "ig_demo"}, "fraud")


async def test_over_the_limit_is_resource_exhausted_with_retry_after(tmp_path: Path) -> None:
    limiter = FakeLimiter()
    limiter.allow = False
    limiter.wait_s = 2.5
    with pytest.raises(ResourceExhausted, match="retry after 3 s") as caught:
        await _admission(tmp_path, limiter).admit({"x-api-key": "ig_demo"}, "fraud")
    assert caught.value.trailing_metadata == (("retry-after", "3"),)


async def test_a_store_failure_falls_back_to_this_replicas_share_of_the_tier(tmp_path: Path) -> None:
    limiter, now = FakeLimiter(), [100.0]
    # Two replicas: the tenant's tier (2/s, burst 3) becomes 1/s, burst 2 here; the model tier 0.5/s, burst 1.
    admission = _admission(tmp_path, limiter, now, replicas=2)
    limiter.fail = True
    assert await _tenant(admission, {"x-api-key": "ig_demo"}, "fraud") == "demo"
    with pytest.raises(ResourceExhausted):  # never unlimited: the model's local bucket is spent
        await admission.admit({"x-api-key": "ig_demo"}, "fraud")
    limiter.fail = False
    # Within retry_store_after_s Redis is not asked again.
    now[0] += 0.5
    with pytest.raises(ResourceExhausted):
        await admission.admit({"x-api-key": "ig_demo"}, "fraud")
    assert limiter.calls == []
    now[0] += 1.0
    assert await _tenant(admission, {"x-api-key": "ig_demo"}, "fraud") == "demo"
    assert len(limiter.calls) == 1
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
