"""JSON logs carry the trace id of the current span; spans export over OTLP when configured."""

from __future__ import annotations

import io
import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from libs.telemetry import TelemetryConfig, setup_logging, setup_tracing


def test_json_log_lines_carry_trace_and_span_ids() -> None:
    stream = io.StringIO()
    setup_logging("svc", "INFO", json_logs=True)
    handler = logging.getLogger().handlers[0]
    handler.setStream(stream)  # type: ignore[attr-defined]
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("work") as span:
        logging.getLogger("x").info("inside", extra={"model": "fraud"})
    logging.getLogger("x").info("outside")
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    ctx = span.get_span_context()
    assert inside["message"] == "inside" and inside["level"] == "INFO" and inside["service"] == "svc"
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
    assert inside["model"] == "fraud"
    assert outside["trace_id"] == ""


def test_tracing_is_off_without_an_endpoint() -> None:
    assert setup_tracing("svc", TelemetryConfig(otlp_endpoint="")) is None
