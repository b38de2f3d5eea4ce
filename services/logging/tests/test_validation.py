"""Validation of inference-log messages: good records pass; each kind of bad one is refused with a reason."""

from __future__ import annotations

import pytest

from infergrid.logging.v1 import logging_pb2
from services.logging.validation import InvalidRecord, validate


def _good() -> logging_pb2.InferenceLogRecord:
    record = logging_pb2.InferenceLogRecord(
        schema_version=logging_pb2.SCHEMA_VERSION_1,
        request_id="req-1",
        model="fraud",
        model_version="1",
        trace_id="0af7651916cd43dd8448eb211c80319c",
        span_id="b7ad6b7169203331",
    )
    record.request_time.FromMicroseconds(1_780_000_000_000_000)
    return record


def test_a_good_record_passes() -> None:
    record = validate(_good().SerializeToString(), [("infergrid-schema-version", b"1")])
    assert record.request_id == "req-1"


def _broken(**changes: object) -> bytes:
    record = _good()
    for name, value in changes.items():
        if value is None:
            record.ClearField(name)
        else:
            setattr(record, name, value)
    return record.SerializeToString()


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        (b"", None, "empty"),
        (b"\xff\xff\xff\xff", None, "not an InferenceLogRecord"),
        (b"hello world", None, ""),
        (_good().SerializeToString(), [("infergrid-schema-version", b"7")], "schema version"),
        (_broken(schema_version=0), None, "schema_version"),
        (_broken(request_id=""), None, "request_id"),
        (_broken(request_id="has space"), None, "request_id"),
        (_broken(request_id="x" * 200), None, "request_id"),
        (_broken(model=""), None, "model"),
        (_broken(model="../etc"), None, "model"),
        (_broken(request_time=None), None, "request_time"),
        (_broken(latency_us=-1), None, "latency_us"),
        (_broken(trace_id="XYZ"), None, "trace_id"),
        (_broken(span_id="123"), None, "span_id"),
    ],
)
def test_bad_messages_are_refused_with_a_reason(
    value: bytes, headers: list[tuple[str, bytes]] | None, reason: str
) -> None:
    with pytest.raises(InvalidRecord) as error:
        validate(value, headers)
    assert reason in error.value.reason


def test_a_time_in_milliseconds_by_mistake_is_refused() -> None:
    record = _good()
    record.request_time.seconds = 1_780_000_000_000
    with pytest.raises(InvalidRecord, match="request_time"):
        validate(record.SerializeToString(), None)
