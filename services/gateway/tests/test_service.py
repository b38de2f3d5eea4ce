"""The gateway over real gRPC, with small fake FeatureService and inference servers behind it.

Status codes and messages as a client sees them, the edge headers (believed only over the mesh's mutual
TLS with Envoy's client certificate: the tests connect as Envoy does), the circuit breakers (features
down: defaults, then no more calls while open; inference down: UNAVAILABLE) and a traffic split changed in
the platform file without a restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from infergrid.types.v1 import value_pb2
from libs import mtls
from libs.server import Server
from services.gateway.config import GatewayConfig, GatewayServerConfig, ModelsConfig, UpstreamConfig
from services.gateway.server import create_server
from services.gateway.tests.fake_servers import FakeFeatureService, FakeInference, serve
from services.gateway.tests.fakes import WEIGHTS, ListPublisher, write_layout


@dataclass
class Stack:
    gateway: gateway_pb2_grpc.PredictionServiceStub
    features: FakeFeatureService
    inference: FakeInference
    inference_server: grpc.aio.Server
    publisher: ListPublisher
    platform: Path
    server: Server


def _platform(weights: tuple[int, int]) -> str:
    return (
        "rate_limit_tiers: {big: {requests_per_second: 1000, burst: 1000}}\n"
        "tenants: {acme: {tier: big, models: ['*']}}\n"
        "models:\n  toy:\n    versions:\n"
        f"      - {{version: '1', weight: {weights[0]}}}\n      - {{version: '2', weight: {weights[1]}}}\n"
    )


# What the edge (through Envoy) adds to an authorized call for `toy`.
EDGE_HEADERS = (
    ("x-infergrid-tenant", "acme"),
    ("x-infergrid-model", "toy"),
    ("x-infergrid-placement", "edge"),
)


class _AsEnvoy(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds the edge's identity headers (for the model the body names, as the edge reads it) to calls that
    set none (the tests' default caller)."""

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        if not details.metadata:
            headers = [EDGE_HEADERS[0], EDGE_HEADERS[2]]
            if request.model:
                headers.append(("x-infergrid-model", request.model))
            details = details._replace(metadata=grpc.aio.Metadata(*headers))
        return await continuation(details, request)


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> mtls.MeshFiles:
    return mtls.ensure_mesh_certificates(tmp_path_factory.mktemp("mesh"))


@pytest.fixture(params=[True, False], ids=["stream", "unary"])
async def stack(tmp_path: Path, request: pytest.FixtureRequest, mesh: mtls.MeshFiles) -> AsyncIterator[Stack]:
    layouts = write_layout(tmp_path / "layouts")
    platform = tmp_path / "platform.yaml"
    platform.write_text(_platform((100, 0)))
    features, inference = FakeFeatureService(), FakeInference()
    (f_server, f_address), (i_server, i_address) = await serve(features), await serve(inference)
    publisher = ListPublisher()
    config = GatewayConfig(
        server=GatewayServerConfig(
            port=0, tls_ca_file=mesh.ca_cert, tls_cert_file=mesh.gateway_cert, tls_key_file=mesh.gateway_key
        ),
        models=ModelsConfig(input_layouts=layouts, platform_file=platform, platform_poll_interval_s=0.05),
        upstream=UpstreamConfig(
            features_target=f_address,
            inference_target=i_address,
            features_timeout_s=0.5,
            breaker_failures=3,
            breaker_reset_s=30.0,
            inference_streaming=request.param,
        ),
        inference_log_enabled=False,
    )
    server = await create_server(config, publisher=publisher)
    await server.start()
    try:
        credentials = mtls.channel_credentials(mesh.ca_cert, mesh.envoy_cert, mesh.envoy_key)
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{server.port}", credentials, interceptors=[_AsEnvoy()]
        ) as channel:
            yield Stack(
                gateway_pb2_grpc.PredictionServiceStub(channel),
                features,
                inference,
                i_server,
                publisher,
                platform,
                server,
            )
    finally:
        await server.stop(0, 0.5)
        await f_server.stop(0)
        await i_server.stop(0)


def _request(**features: float) -> gateway_pb2.PredictRequest:
    req = gateway_pb2.PredictRequest(model="toy", entities={"user_id": "u1", "merchant_id": "m1"})
    for name, value in {"amount": 5.0, "hour": 3.0, **features}.items():
        req.features[name].float_value = value
    return req


async def test_predict_over_grpc_with_the_edge_headers(stack: Stack) -> None:
    reply = await stack.gateway.Predict(_request(), timeout=5, metadata=EDGE_HEADERS)
    expected = float(np.asarray([5, 40, 3, 3, 0.25], dtype=np.float32) @ WEIGHTS + 1.0)
    assert reply.model == "toy" and reply.model_version == "1"
    assert reply.outputs["score"].float_value == pytest.approx(expected, rel=1e-6)
    assert not reply.degraded and reply.request_id
    (record,) = stack.publisher.records
    assert record.tenant == "acme" and record.request_id == reply.request_id


async def test_predict_batch_answers_in_row_order(stack: Stack) -> None:
    request = gateway_pb2.PredictBatchRequest(model="toy", version="2")
    for amount in (1.0, 2.0, 3.0):
        row = request.rows.add(entities={"user_id": "u1", "merchant_id": "m1"})
        row.features["amount"].float_value = amount
    reply = await stack.gateway.PredictBatch(request, timeout=5)
    scores = [r.outputs["score"].float_value for r in reply.results]
    assert scores == sorted(scores) and len(set(scores)) == 3
    assert all(r.model_version == "2" and r.degraded_features == ["hour"] for r in reply.results)


@pytest.mark.parametrize(
    ("model", "bad_amount", "code", "text"),
    [
        ("", None, grpc.StatusCode.INVALID_ARGUMENT, "model"),
        ("ghost", None, grpc.StatusCode.NOT_FOUND, "ghost"),
        ("toy", "ten", grpc.StatusCode.INVALID_ARGUMENT, "features.amount"),
    ],
)
async def test_bad_requests_get_the_status_naming_the_problem(
    stack: Stack, model: str, bad_amount: str | None, code: grpc.StatusCode, text: str
) -> None:
    request = _request()
    request.model = model
    if bad_amount:
        request.features["amount"].string_value = bad_amount
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.gateway.Predict(request, timeout=5)
    assert info.value.code() == code and text in (info.value.details() or "")
    await stack.gateway.Predict(_request(), timeout=5)  # still serving


async def test_a_model_other_than_the_authorized_one_is_denied(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.gateway.Predict(
            _request(),
            timeout=5,
            metadata=(*EDGE_HEADERS[:1], ("x-infergrid-model", "other"), EDGE_HEADERS[2]),
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_features_down_serves_defaults_and_the_breaker_stops_calling(stack: Stack) -> None:
    stack.features.down = True
    for _ in range(8):
        reply = await stack.gateway.Predict(_request(), timeout=5)
        assert reply.degraded
        assert set(reply.degraded_features) == {"user:age", "user:count", "merchant:risk"}
    # 3 failed calls (each retried once by gRPC) opened the breaker; later rows did not call.
    assert stack.features.calls <= 6


async def test_inference_down_is_unavailable(stack: Stack) -> None:
    await stack.inference_server.stop(0)
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.gateway.Predict(_request(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_changed_split_applies_without_restart(stack: Stack) -> None:
    assert (await stack.gateway.Predict(_request(), timeout=5)).model_version == "1"
    stack.platform.write_text(_platform((0, 100)))
    for _ in range(100):
        if (await stack.gateway.Predict(_request(), timeout=5)).model_version == "2":
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the new split never applied")
    stack.platform.write_text("models: {toy: {versions: []}}\n")  # invalid: the last good split stays
    await asyncio.sleep(0.2)
    assert (await stack.gateway.Predict(_request(), timeout=5)).model_version == "2"


async def test_entity_keys_are_sent_as_the_type_their_view_declares(stack: Stack) -> None:
    stack.features.user_key_type = value_pb2.VALUE_TYPE_INT64
    request = _request()
    request.entities["user_id"] = "42"
    reply = await stack.gateway.Predict(request, timeout=5)
    assert not reply.degraded
    request.entities["user_id"] = "forty-two"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.gateway.Predict(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "entities.user_id: expected an integer" in (info.value.details() or "")


async def test_outbound_calls_carry_the_callers_deadline(stack: Stack) -> None:
    await stack.gateway.Predict(_request(), timeout=5)  # budgets: features 0.5 s, inference 0.5 s
    features_left, inference_left = stack.features.time_remaining[-1], stack.inference.time_remaining[-1]
    assert features_left is not None and features_left <= 0.51  # gRPC rounds deadlines up slightly
    assert inference_left is not None and inference_left <= 0.51
    await stack.gateway.Predict(_request(), timeout=0.2)  # a shorter caller deadline lowers both
    features_left, inference_left = stack.features.time_remaining[-1], stack.inference.time_remaining[-1]
    assert features_left is not None and features_left <= 0.21
    assert inference_left is not None and inference_left <= 0.21


async def test_a_failed_streamed_batch_keeps_its_status_and_the_stream(stack: Stack) -> None:
    stack.inference.fail_with = "model 'toy' version '1' is not loaded"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.gateway.Predict(_request(), timeout=5)
    stack.inference.fail_with = ""
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not loaded in the inference service" in (info.value.details() or "")
    assert (await stack.gateway.Predict(_request(), timeout=5)).model_version == "1"
