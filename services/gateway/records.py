"""The inference-log record of a row: what the gateway writes ahead for every answered or failed prediction.

Every record field is set here, nowhere else in the gateway. Two parts are pre-framed per model because
they are on the hot path: the `features` map (every model input as a float; filling a template's value
bytes and parsing it in C is cheaper than setting the map entries: bench/results/code-figures.md) and the `feature_event_times` entries.
Their field numbers come from the generated descriptors, so a renumbered proto field cannot go unnoticed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import numpy as np
from google.protobuf import timestamp_pb2
from opentelemetry import trace

from infergrid.logging.v1 import logging_pb2
from infergrid.types.v1 import value_pb2
from libs.errors import ServiceError, status_code_of
from libs.inference_log import CURRENT_SCHEMA_VERSION
from libs.wire import frame, tag, varint

if TYPE_CHECKING:
    from services.gateway.catalog import ModelSpec

Record = logging_pb2.InferenceLogRecord


def _map_tags(name: str) -> tuple[bytes, bytes, bytes]:
    """The tags of a record map field and of its entries' key and value."""
    field = Record.DESCRIPTOR.fields_by_name[name]
    entry = field.message_type.fields_by_name
    return tag(field), tag(entry["key"]), tag(entry["value"])


_FEATURES_TAG, _FEATURE_KEY_TAG, _FEATURE_VALUE_TAG = _map_tags("features")
_FLOAT_VALUE_TAG = tag(value_pb2.Value.DESCRIPTOR.fields_by_name["float_value"])
_EVENT_TIMES_TAG, _EVENT_KEY_TAG, _EVENT_VALUE_TAG = _map_tags("feature_event_times")
_SECONDS_TAG = tag(timestamp_pb2.Timestamp.DESCRIPTOR.fields_by_name["seconds"])
_NANOS_TAG = tag(timestamp_pb2.Timestamp.DESCRIPTOR.fields_by_name["nanos"])
# The tag and one-byte length of an event-time entry shorter than 128 bytes (nearly all), by length.
_EVENT_TIMES_HEADS = tuple(_EVENT_TIMES_TAG + bytes((size,)) for size in range(128))


@dataclass(frozen=True, eq=False)
class RecordTemplate:
    """A model's pre-framed record parts (see the module docstring)."""

    # The `features` map with every input as a float and the value bytes zeroed; `feature_slots` are the
    # byte positions of the values, in column order.
    features_wire: np.ndarray
    feature_slots: np.ndarray
    # Per store column (in the spec's `store_refs` order): the framed key of its `feature_event_times` entry.
    event_time_keys: tuple[bytes, ...]


def record_template(feature_names: Sequence[str], store_columns: Sequence[int]) -> RecordTemplate:
    """The record template of a model whose inputs are `feature_names`, store-fed at `store_columns`."""
    parts: list[bytes] = []
    slots: list[int] = []
    position = 0
    value = _FLOAT_VALUE_TAG  # Value { float_value (fixed32) }, its 4 bytes follow
    for name in feature_names:
        key = name.encode()
        entry = frame(_FEATURE_KEY_TAG, key) + _FEATURE_VALUE_TAG + varint(len(value) + 4) + value
        head = _FEATURES_TAG + varint(len(entry) + 4) + entry
        slots.extend(range(position + len(head), position + len(head) + 4))
        parts.append(head + bytes(4))
        position += len(head) + 4
    keys = (feature_names[i].encode() for i in store_columns)
    return RecordTemplate(
        features_wire=np.frombuffer(b"".join(parts), dtype=np.uint8).copy(),
        feature_slots=np.asarray(slots, dtype=np.intp),
        event_time_keys=tuple(frame(_EVENT_KEY_TAG, key) for key in keys),
    )


def event_times_wire(spec: ModelSpec, event_us: Sequence[int]) -> bytes:
    """The `feature_event_times` entries of a record, in wire format, for one row's store features.

    Args:
        spec: The model.
        event_us: Per store ref (in `spec.store_refs` order), the event time of the value used in
            microseconds since the epoch; 0 where a default was used (no entry is written for it).

    Returns:
        Bytes to merge into an InferenceLogRecord (empty when no value came from the store).
    """
    parts: list[bytes] = []
    stamps: dict[int, bytes] = {}  # a view's features usually share one event time
    for key, us in zip(spec.record.event_time_keys, event_us, strict=True):
        if not us:
            continue
        stamp = stamps.get(us)
        if stamp is None:
            seconds, micros = divmod(us, 1_000_000)
            body = (_SECONDS_TAG + varint(seconds)) if seconds else b""  # negative: ten bytes
            if micros:
                body += _NANOS_TAG + varint(micros * 1000)
            stamp = stamps[us] = frame(_EVENT_VALUE_TAG, body)
        entry = key + stamp
        size = len(entry)
        parts.append(_EVENT_TIMES_HEADS[size] + entry if size < 128 else frame(_EVENT_TIMES_TAG, entry))
    return b"".join(parts)


def new_record(
    spec: ModelSpec,
    *,
    request_id: str,
    version: str,
    tenant: str,
    entities: Mapping[str, str],
    request_inputs: Mapping[str, value_pb2.Value],
    values: np.ndarray,
    event_us: np.ndarray | None,
    start_ns: int,
    end_ns: int,
    span_context: trace.SpanContext,
) -> Record:
    """A row's record without its outcome: who, what, when, the model inputs as scored and their event times.

    Args:
        spec: The model.
        request_id: The row's request id.
        version: The version that scored (or was to score) the row.
        tenant: The caller's tenant.
        entities: The row's entity keys.
        request_inputs: The row's request-time inputs, as sent.
        values: The FP32 model input row (column order).
        event_us: Per store ref, the event time (µs) of the value used, 0 where a default was; None: unknown.
        start_ns: When the call arrived (ns since the epoch).
        end_ns: When the row was answered (ns since the epoch).
        span_context: The call's span (its trace and span ids go into the record when valid).
    """
    record = Record(
        schema_version=CURRENT_SCHEMA_VERSION,
        request_id=request_id,
        tenant=tenant,
        model=spec.name,
        model_version=version,
        entities=entities,
        request_inputs=request_inputs,
        latency_us=(end_ns - start_ns) // 1000,
    )
    record.request_time.FromNanoseconds(start_ns)
    record.response_time.FromNanoseconds(end_ns)
    template = spec.record
    wire = template.features_wire.copy()
    wire[template.feature_slots] = np.ascontiguousarray(values).view(np.uint8)
    times = b"" if event_us is None else event_times_wire(spec, event_us.tolist())
    record.MergeFromString(wire.tobytes() + times)
    if span_context.is_valid:
        record.trace_id = format(span_context.trace_id, "032x")
        record.span_id = format(span_context.span_id, "016x")
    return record


def set_answer(
    record: Record, outputs: Mapping[str, np.ndarray], degraded: Sequence[str], *, cached: bool
) -> None:
    """The outcome of an answered row: its outputs, the inputs that fell back to defaults, cache use."""
    for name, array in outputs.items():
        set_value(record.outputs[name], array)
    record.degraded = bool(degraded)
    record.degraded_features.extend(degraded)
    record.cached = cached


def set_failure(record: Record, error: ServiceError, degraded: Sequence[str]) -> None:
    """The outcome of a failed row: its status and message, the inputs that fell back to defaults."""
    record.status_code = error.code.value[0]
    record.error_message = error.message[:1000]
    record.degraded = bool(degraded)
    record.degraded_features.extend(degraded)


def set_shadow(
    record: Record, version: str, outcome: Mapping[str, np.ndarray] | BaseException, latency_us: int
) -> str:
    """The shadow version's outputs for the row, or its failure; returns the outcome's status name."""
    shadow = record.shadow
    shadow.model_version = version
    shadow.latency_us = max(0, latency_us)
    if not isinstance(outcome, BaseException):
        for name, array in outcome.items():
            set_value(shadow.outputs[name], array)
        return "OK"
    code = status_code_of(outcome) or grpc.StatusCode.UNKNOWN
    shadow.status_code = code.value[0]
    return code.name


def set_value(target: value_pb2.Value, array: np.ndarray) -> None:
    """An output tensor as a Value: a float when it holds one number, otherwise a float list."""
    if array.size == 1:
        target.float_value = float(array.reshape(-1)[0])
    else:
        target.float_list_value.values.extend(array.reshape(-1).tolist())
