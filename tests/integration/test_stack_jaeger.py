"""The stack's Jaeger receives a span over OTLP and serves it on its HTTP query API."""

import json
import time
import uuid
from urllib.parse import quote

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from stack.jaeger import Jaeger
from stack.probes import http_get

pytestmark = pytest.mark.integration


def test_span_exported_over_otlp_shows_up_in_the_query_api(jaeger_server: Jaeger) -> None:
    service = f"stack-test-{uuid.uuid4().hex[:8]}"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=jaeger_server.otlp_grpc_endpoint, insecure=True))
    )
    with provider.get_tracer("stack-test").start_as_current_span("predict") as span:
        span.set_attribute("model", "fraud")
    provider.shutdown()

    # Jaeger batches what it receives: poll.
    url = f"{jaeger_server.query_url}/api/traces?service={quote(service)}&limit=10"
    spans: list[dict[str, object]] = []
    deadline = time.monotonic() + 30
    while not spans and time.monotonic() < deadline:
        answer = http_get(url)
        if answer is not None and answer.status == 200:
            spans = [s for trace in json.loads(answer.body).get("data") or [] for s in trace["spans"]]
        if not spans:
            time.sleep(0.5)

    assert [s["operationName"] for s in spans] == ["predict"]
    assert {"key": "model", "type": "string", "value": "fraud"} in spans[0]["tags"]  # type: ignore[operator]


def test_services_endpoint_lists_json(jaeger_server: Jaeger) -> None:
    answer = http_get(f"{jaeger_server.query_url}/api/services")
    assert answer is not None
    assert answer.status == 200
    assert "data" in json.loads(answer.body)
