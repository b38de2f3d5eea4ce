"""Server spans from the standard interceptor, over a real gRPC channel: the caller's sampling decision holds."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from infergrid.features.v1 import features_pb2, features_pb2_grpc
from libs.server import ServerConfig
from libs.telemetry import Telemetry
from libs.tests.echo_service import SERVICE, build

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
METHOD = f"/{SERVICE}/GetFeatureView"


@pytest.fixture(params=["aio", "threaded"])
async def traced(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[InMemorySpanExporter, features_pb2_grpc.FeatureServiceStub]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # the default sampler: roots sampled, children follow their parent
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = build(
        ServerConfig(port=0, drain_seconds=0, grace_seconds=0.5, transport=request.param),
        Telemetry("echo", provider, None),
    )
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield exporter, features_pb2_grpc.FeatureServiceStub(channel)
    await server.stop(0, 0.5)


async def _call(stub: features_pb2_grpc.FeatureServiceStub, name: str, flags: str | None) -> None:
    metadata = [("traceparent", f"00-{TRACE_ID}-b7ad6b7169203331-{flags}")] if flags else None
    with contextlib.suppress(grpc.aio.AioRpcError):
        await stub.GetFeatureView(features_pb2.GetFeatureViewRequest(name=name), metadata=metadata)


async def _finished(exporter: InMemorySpanExporter) -> tuple[ReadableSpan, ...]:
    """The finished spans, once there are any (within 2 s). On grpc.aio a failed call's status reaches the
    caller while the server is still in `context.abort`: its span ends right after, not before."""
    deadline = time.monotonic() + 2
    while not (spans := exporter.get_finished_spans()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return tuple(spans)


async def test_a_sampled_parent_gets_a_server_span_in_its_trace(
    traced: tuple[InMemorySpanExporter, features_pb2_grpc.FeatureServiceStub],
) -> None:
    exporter, stub = traced
    await _call(stub, "ok", "01")
    (span,) = exporter.get_finished_spans()
    assert span.name == METHOD and span.kind == SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    assert span.attributes is not None
    assert span.attributes["rpc.service"] == SERVICE and span.attributes["rpc.method"] == "GetFeatureView"
    assert span.attributes["rpc.grpc.status_code"] == 0


async def test_an_unsampled_parent_gets_no_span_and_a_root_gets_one(
    traced: tuple[InMemorySpanExporter, features_pb2_grpc.FeatureServiceStub],
) -> None:
    exporter, stub = traced
    await _call(stub, "ok", "00")
    assert exporter.get_finished_spans() == ()
    await _call(stub, "down", None)
    (span,) = await _finished(exporter)
    assert span.parent is None and format(span.context.trace_id, "032x") != TRACE_ID
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]


async def test_the_handler_runs_in_the_callers_trace(
    traced: tuple[InMemorySpanExporter, features_pb2_grpc.FeatureServiceStub],
) -> None:
    """On either transport (on the threaded one the `async def` method runs on the loop, not the server
    thread) the method's code sees the caller's trace, so its own calls carry it on."""
    _, stub = traced
    metadata = [("traceparent", f"00-{TRACE_ID}-b7ad6b7169203331-01")]
    view = await stub.GetFeatureView(features_pb2.GetFeatureViewRequest(name="trace"), metadata=metadata)
    assert view.description == TRACE_ID
