"""Validation of inference-log messages: what a record must hold before it reaches the sinks."""

from __future__ import annotations

import re
from collections.abc import Sequence

from google.protobuf.message import DecodeError

from infergrid.logging.v1 import logging_pb2
from libs.inference_log import SCHEMA_VERSION_HEADER
from libs.kafka import header
from libs.request_id import MAX_REQUEST_ID_CHARS, request_id_problem  # noqa: F401 - re-exported

SUPPORTED_SCHEMA_VERSIONS = frozenset({int(logging_pb2.SCHEMA_VERSION_1)})
# Model names become directory names in the data lake: keep them to a safe alphabet.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
# Accepted request_time range: 2000-01-01 .. 2200-01-01 (catches unset and unit-confused times).
_MIN_TIME_S = 946_684_800
_MAX_TIME_S = 7_258_118_400


class InvalidRecord(ValueError):
    """A message that cannot be stored; `reason` goes into the dead-letter header."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def validate(
    value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None
) -> logging_pb2.InferenceLogRecord:
    """Parses and checks one Kafka message of the inference-log topic.

    Returns:
        The record.

    Raises:
        InvalidRecord: the message is not a storable record; the reason names the field.
    """
    if not value:
        raise InvalidRecord("empty message value")
    version_header = header(headers, SCHEMA_VERSION_HEADER)
    if version_header is not None and (
        not version_header.isdigit() or int(version_header) not in SUPPORTED_SCHEMA_VERSIONS
    ):
        raise InvalidRecord(f"header {SCHEMA_VERSION_HEADER}: unsupported schema version {version_header!r}")
    try:
        record = logging_pb2.InferenceLogRecord.FromString(value)
    except DecodeError as exc:
        raise InvalidRecord(f"value is not an InferenceLogRecord: {exc}") from None
    check(record)
    return record


def check(record: logging_pb2.InferenceLogRecord) -> None:
    """Checks the fields of a parsed record; raises InvalidRecord naming the first bad one."""
    if int(record.schema_version) not in SUPPORTED_SCHEMA_VERSIONS:
        raise InvalidRecord(f"schema_version: unsupported value {int(record.schema_version)}")
    problem = request_id_problem(record.request_id)
    if problem:
        raise InvalidRecord(f"request_id: {problem}")
    if not MODEL_NAME.match(record.model):
        raise InvalidRecord(f"model: {record.model[:140]!r} is not a model name ([A-Za-z0-9._-], 1-128)")
    if not record.HasField("request_time"):
        raise InvalidRecord("request_time: not set")
    if not _MIN_TIME_S <= record.request_time.seconds < _MAX_TIME_S:
        raise InvalidRecord(f"request_time: {record.request_time.seconds} s is outside 2000..2200")
    if record.latency_us < 0:
        raise InvalidRecord(f"latency_us: negative ({record.latency_us})")
    if record.trace_id and not _HEX32.match(record.trace_id):
        raise InvalidRecord("trace_id: must be 32 lowercase hex digits")
    if record.span_id and not _HEX16.match(record.span_id):
        raise InvalidRecord("span_id: must be 16 lowercase hex digits")
