"""Trace context survives a round trip through Kafka record headers."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.sdk.trace import TracerProvider

from libs.kafka import KafkaConfig, context_from_headers, header


def test_trace_context_round_trips_through_headers() -> None:
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("publish") as span:
        carrier = {"infergrid-schema-version": "1"}
        inject(carrier)  # what a producer's W3C propagator writes
        headers = [(key, value.encode()) for key, value in carrier.items()]
    assert header(headers, "infergrid-schema-version") == "1"
    restored = trace.get_current_span(context_from_headers(headers)).get_span_context()
    assert restored.trace_id == span.get_span_context().trace_id
    assert restored.span_id == span.get_span_context().span_id


def test_no_headers_gives_an_invalid_parent() -> None:
    assert not trace.get_current_span(context_from_headers(None)).get_span_context().is_valid


def test_client_conf_includes_sasl_only_when_configured() -> None:
    assert "sasl.mechanism" not in KafkaConfig().client_conf()
    conf = KafkaConfig(
        kafka_sasl_mechanism="PLAIN", kafka_sasl_username="u", kafka_sasl_password="p"
    ).client_conf()
    assert conf["sasl.username"] == "u" and conf["sasl.password"] == "p"
