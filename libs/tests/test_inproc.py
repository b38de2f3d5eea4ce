"""The in-process transport (libs.inproc): a published server's handlers answer the generated stubs the way
a network call would, through `dial` and the channel pool, without a port."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY

from infergrid.features.v1 import features_pb2, features_pb2_grpc
from libs import inproc
from libs.channels import dial
from libs.discovery import LocalTarget, Resolver, TargetError, parse_targets
from libs.errors import status_code_of
from libs.pool import ChannelPool
from libs.resilience import DependencyPolicy
from libs.server import Server, ServerConfig
from libs.tests.echo_service import FAILURES, SERVICE, build

NAME = "echo-under-test"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    built = build(ServerConfig(port=0))
    built.publish(NAME)
    await built.start()
    try:
        yield built
    finally:
        inproc.withdraw(NAME)
        await built.stop(0, 0.5)


def _stub() -> features_pb2_grpc.FeatureServiceStub:
    return features_pb2_grpc.FeatureServiceStub(dial(f"inproc:{NAME}", SERVICE, DependencyPolicy()))


def _handled(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "grpc_server_handled_total", {"grpc_service": SERVICE, "grpc_method": method, "grpc_code": code}
    )
    return value or 0.0


async def test_a_call_runs_the_wrapped_handler_and_counts_in_its_metrics(server: Server) -> None:
    before = _handled("GetFeatureView", "OK")
    view = await _stub().GetFeatureView(features_pb2.GetFeatureViewRequest(name="plain"), timeout=5)
    assert view.name == "plain"
    assert _handled("GetFeatureView", "OK") == before + 1
    # A plain `def` method answers too, on the caller's loop thread.
    listed = await _stub().ListFeatureViews(features_pb2.ListFeatureViewsRequest(), timeout=5)
    assert listed.feature_views[0].description.endswith("in a loop")


async def test_health_is_served_in_process_too(server: Server) -> None:
    health = health_pb2_grpc.HealthStub(dial(f"inproc:{NAME}", SERVICE, DependencyPolicy()))
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(("name", "code", "details"), FAILURES)
async def test_a_failure_reaches_the_caller_as_the_status_a_network_call_gets(
    server: Server, name: str, code: grpc.StatusCode, details: str
) -> None:
    before = _handled("GetFeatureView", code.name)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _stub().GetFeatureView(features_pb2.GetFeatureViewRequest(name=name), timeout=5)
    assert caught.value.code() == code
    assert caught.value.details() == details
    assert status_code_of(caught.value) == code
    assert "hunter2" not in (caught.value.details() or "")
    assert _handled("GetFeatureView", code.name) == before + 1


async def test_the_callers_deadline_bounds_the_handler(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _stub().GetFeatureView(features_pb2.GetFeatureViewRequest(name="slow:5"), timeout=0.05)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 4  # not the handler's 5 s


async def test_the_handler_runs_in_the_callers_trace(server: Server) -> None:
    tracer = TracerProvider().get_tracer(__name__)
    with tracer.start_as_current_span("caller") as span:
        view = await _stub().GetFeatureView(features_pb2.GetFeatureViewRequest(name="trace"), timeout=5)
    assert view.description == format(span.get_span_context().trace_id, "032x")
    assert trace.get_current_span() is not span


async def test_a_pre_serialized_reply_is_parsed_by_the_callers_deserializer() -> None:
    handler = grpc.unary_unary_rpc_method_handler(
        _bytes_reply, response_serializer=features_pb2.FeatureView.SerializeToString
    )
    inproc.publish("bytes", {f"/{SERVICE}/GetFeatureView": handler})
    try:
        view = await _stub_of("bytes").GetFeatureView(features_pb2.GetFeatureViewRequest(name="b"), timeout=5)
    finally:
        inproc.withdraw("bytes")
    assert isinstance(view, features_pb2.FeatureView) and view.name == "from bytes"


async def _bytes_reply(request: features_pb2.GetFeatureViewRequest, context: object) -> bytes:
    return features_pb2.FeatureView(name="from bytes").SerializeToString()


def _stub_of(name: str) -> features_pb2_grpc.FeatureServiceStub:
    return features_pb2_grpc.FeatureServiceStub(inproc.LocalChannel(f"inproc:{name}"))


async def test_what_cannot_be_called_in_process_says_why(server: Server) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _stub_of("nobody").GetFeatureView(features_pb2.GetFeatureViewRequest(name="x"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "inproc:nobody" in (caught.value.details() or "")
    health = health_pb2_grpc.HealthStub(inproc.LocalChannel(f"inproc:{NAME}"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        health.Watch(health_pb2.HealthCheckRequest())
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/grpc.health.v1.Health/Watch" in (caught.value.details() or "")


async def test_a_threaded_server_cannot_be_published() -> None:
    threaded = build(ServerConfig(port=0, transport="threaded"))
    try:
        with pytest.raises(ValueError, match="aio transport"):
            threaded.publish("threaded")
    finally:
        await threaded.stop(0, 0.1)


async def test_an_inproc_target_resolves_to_itself_and_the_pool_calls_it(server: Server) -> None:
    targets = parse_targets(f"inproc:{NAME}")
    assert targets == (LocalTarget(NAME),)
    assert await Resolver().resolve(targets) == (f"inproc:{NAME}",)
    with pytest.raises(TargetError, match="inproc:<name>"):
        parse_targets("inproc:")
    policy = DependencyPolicy()
    pool = ChannelPool("echo", lambda address: dial(address, SERVICE, policy), policy)
    pool.update([f"inproc:{NAME}"])

    async def _call(endpoint):  # type: ignore[no-untyped-def]
        stub = endpoint.stub(features_pb2_grpc.FeatureServiceStub)
        return await stub.GetFeatureView(features_pb2.GetFeatureViewRequest(name="pooled"), timeout=5)

    try:
        assert (await pool.call(_call, f"{SERVICE}/GetFeatureView")).name == "pooled"
    finally:
        await pool.close()
