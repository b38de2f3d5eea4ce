"""Encodings of feature values: typed Values, entity keys, stored cells, cache records and wire frames.

Values are kept as serialized `infergrid.types.v1.Value` bytes end to end: written
by clients, stored in Cassandra, cached in Redis and copied into responses without
being parsed again. A response is assembled from pre-framed protobuf fields (see
`response.py`), so its per-value cost is one list append.
"""

from __future__ import annotations

import itertools
import re
import struct
from collections.abc import Sequence
from functools import cache, lru_cache
from typing import Any

from google.protobuf import timestamp_pb2

from infergrid.features.v1 import features_pb2
from infergrid.types.v1 import value_pb2
from libs.wire import frame, tag, varint

VT = value_pb2.ValueType
Value = value_pb2.Value

# The `Value.kind` oneof field that holds each type.
ONEOF_BY_TYPE: dict[int, str] = {
    VT.VALUE_TYPE_FLOAT: "float_value",
    VT.VALUE_TYPE_DOUBLE: "double_value",
    VT.VALUE_TYPE_INT64: "int64_value",
    VT.VALUE_TYPE_STRING: "string_value",
    VT.VALUE_TYPE_BYTES: "bytes_value",
    VT.VALUE_TYPE_BOOL: "bool_value",
    VT.VALUE_TYPE_FLOAT_LIST: "float_list_value",
    VT.VALUE_TYPE_DOUBLE_LIST: "double_list_value",
    VT.VALUE_TYPE_INT64_LIST: "int64_list_value",
    VT.VALUE_TYPE_STRING_LIST: "string_list_value",
}
# Types an entity key column may have.
KEY_TYPES = frozenset({VT.VALUE_TYPE_STRING, VT.VALUE_TYPE_INT64, VT.VALUE_TYPE_BYTES})

# An event time that marks "no value stored" in a record.
MISSING = -(2**63)
# The tags of GetOnlineFeaturesResponse's and its FeatureVector's fields (from the generated descriptors),
# and a vector's entries with no value.
_RESPONSE_FIELDS = features_pb2.GetOnlineFeaturesResponse.DESCRIPTOR.fields_by_name
FEATURE_NAMES_TAG = tag(_RESPONSE_FIELDS["feature_names"])
RESULTS_TAG = tag(_RESPONSE_FIELDS["results"])
POSSIBLY_STALE_TAG = tag(_RESPONSE_FIELDS["possibly_stale"])
_VECTOR_FIELDS = features_pb2.GetOnlineFeaturesResponse.FeatureVector.DESCRIPTOR.fields_by_name
VALUES_TAG = tag(_VECTOR_FIELDS["values"])
STATUSES_TAG = tag(_VECTOR_FIELDS["statuses"])
EVENT_TIMESTAMPS_TAG = tag(_VECTOR_FIELDS["event_timestamps"])
_SECONDS_TAG = tag(timestamp_pb2.Timestamp.DESCRIPTOR.fields_by_name["seconds"])
_NANOS_TAG = tag(timestamp_pb2.Timestamp.DESCRIPTOR.fields_by_name["nanos"])
EMPTY_VALUE_FRAME = frame(VALUES_TAG, b"")
EMPTY_TS_FRAME = frame(EVENT_TIMESTAMPS_TAG, b"")
_INT64_MAX = 2**63 - 1
_EVENT = struct.Struct(">q")
_DECIMAL = re.compile(r"[+-]?[0-9]{1,20}")
_CACHE_VERSION = 1
NEGATIVE_PAYLOAD = b"\x00"


def type_name(value_type: int) -> str:
    """'FLOAT' for VALUE_TYPE_FLOAT."""
    try:
        return VT.Name(value_type).removeprefix("VALUE_TYPE_")
    except ValueError:
        return str(value_type)


def kind_name(value: Value) -> str:
    """The type a Value holds, as named by `type_name`, or 'null'."""
    kind = value.WhichOneof("kind")
    return kind.removesuffix("_value").upper() if kind else "null"


def value_frame(raw_value: bytes) -> bytes:
    """`FeatureVector.values` entry holding a serialized Value."""
    return frame(VALUES_TAG, raw_value)


@lru_cache(maxsize=65_536)
def ts_frame(event_us: int) -> bytes:
    """`FeatureVector.event_timestamps` entry: a Timestamp for `event_us` microseconds."""
    seconds, micros = divmod(event_us, 1_000_000)
    body = b""
    if seconds:
        body += _SECONDS_TAG + varint(seconds)
    if micros:
        body += _NANOS_TAG + varint(micros * 1000)
    return frame(EVENT_TIMESTAMPS_TAG, body)


# Entity keys.


def key_part(value: Value, value_type: int) -> bytes | None:
    """The bytes of one key column value, or None when the Value does not hold `value_type`.

    A key may also arrive as a string (callers such as the gateway know keys only as text): it is
    converted to the column's declared type, a decimal integer for INT64 and UTF-8 for BYTES.
    """
    kind = value.WhichOneof("kind")
    if value_type == VT.VALUE_TYPE_STRING:
        return value.string_value.encode() if kind == "string_value" else None
    if value_type == VT.VALUE_TYPE_INT64:
        if kind == "int64_value":
            return _EVENT.pack(value.int64_value)
        number = int_key(value.string_value) if kind == "string_value" else None
        return None if number is None else _EVENT.pack(number)
    if value_type == VT.VALUE_TYPE_BYTES:
        if kind == "string_value":
            return value.string_value.encode()
        return value.bytes_value if kind == "bytes_value" else None
    return None


def int_key(text: str) -> int | None:
    """The INT64 a key given as text stands for (decimal, optional sign), or None."""
    if not _DECIMAL.fullmatch(text):
        return None
    number = int(text)
    return number if -(2**63) <= number <= _INT64_MAX else None


def join_key(parts: Sequence[bytes]) -> bytes:
    """One entity key from its column parts (a single column is its bytes as they are)."""
    if len(parts) == 1:
        return parts[0]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


# Stored cells: 8-byte big-endian event time (µs since the epoch) + serialized Value.


def cell(event_us: int, raw_value: bytes) -> bytes:
    """The stored form of one feature value."""
    return _EVENT.pack(event_us) + raw_value


class Record:
    """One entity's values in a view, positional: index i is the view's i-th feature.

    Features are only ever appended to a view, so an index keeps its meaning; a
    record made before a feature was added is simply shorter. The value frames
    are kept as one blob (`blob`, frame lengths `lens`) and sliced only when a
    caller needs them one by one; when every frame has the same length (a view
    of floats, say) `fixed` is that length and the blob can be read as a matrix.
    """

    __slots__ = (
        "_frames",
        "blob",
        "complete",
        "events",
        "fixed",
        "lens",
        "min_event",
        "ts_frames",
        "uniform_ts",
    )

    def __init__(
        self,
        events: Sequence[int],
        frames: Sequence[bytes] | None = None,
        *,
        blob: bytes = b"",
        lens: Sequence[int] = (),
    ) -> None:
        self.events = tuple(events)
        if frames is not None:
            self._frames: tuple[bytes, ...] | None = tuple(frames)
            self.blob = b"".join(self._frames)
            self.lens = tuple(len(f) for f in self._frames)
        else:
            self._frames = None
            self.blob = blob
            self.lens = tuple(lens)
        first = self.lens[0] if self.lens else 0
        self.fixed = first if self.lens and self.lens.count(first) == len(self.lens) else 0
        distinct = set(self.events)
        if len(distinct) == 1:
            # The common case: every feature was written together, at one event time.
            (event,) = distinct
            stamp = EMPTY_TS_FRAME if event == MISSING else ts_frame(event)
            self.uniform_ts: bytes | None = stamp
            self.ts_frames: tuple[bytes, ...] = (stamp,) * len(self.events)
            self.complete = event != MISSING
            self.min_event = event
            return
        self.uniform_ts = None
        self.ts_frames = tuple(EMPTY_TS_FRAME if e == MISSING else ts_frame(e) for e in self.events)
        distinct.discard(MISSING)
        self.complete = MISSING not in self.events
        self.min_event = min(distinct) if distinct else MISSING

    @property
    def frames(self) -> tuple[bytes, ...]:
        """The value frames, one per feature."""
        if self._frames is None:
            starts = list(itertools.accumulate(self.lens, initial=0))
            self._frames = tuple(map(self.blob.__getitem__, map(slice, starts, starts[1:])))
        return self._frames

    def __len__(self) -> int:
        return len(self.events)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and (self.events, self.lens, self.blob) == (
            other.events,
            other.lens,
            other.blob,
        )

    def __hash__(self) -> int:
        return hash((self.events, self.blob))

    def __repr__(self) -> str:
        return f"Record(events={self.events!r}, frames={self.frames!r})"

    @classmethod
    def from_cells(cls, feature_names: Sequence[str], cells: dict[str, bytes] | Any) -> Record:
        """A record from a stored row's `{feature: cell}` map, in the view's feature order."""
        events: list[int] = []
        frames: list[bytes] = []
        for name in feature_names:
            blob = cells.get(name)
            if blob is None:
                events.append(MISSING)
                frames.append(EMPTY_VALUE_FRAME)
            else:
                events.append(_EVENT.unpack_from(blob)[0])
                frames.append(value_frame(blob[8:]))
        return cls(events, frames)


@cache
def _structs(n: int) -> tuple[struct.Struct, struct.Struct]:
    return struct.Struct(f"<{n}q"), struct.Struct(f"<{n}I")


def encode_record(record: Record | None) -> bytes:
    """The cache payload of a record; `None` (no values stored) is the negative entry."""
    if record is None:
        return NEGATIVE_PAYLOAD
    n = len(record.events)
    events_s, lens_s = _structs(n)
    return b"".join(
        (
            struct.pack("<BH", _CACHE_VERSION, n),
            events_s.pack(*record.events),
            lens_s.pack(*record.lens),
            record.blob,
        )
    )


class CorruptPayload(ValueError):
    """A cache payload that this version cannot read; treated as a miss."""


def decode_record(payload: bytes) -> Record | None:
    """The record of a cache payload; None for the negative entry.

    Raises:
        CorruptPayload: The payload is truncated or of an unknown version.
    """
    if payload == NEGATIVE_PAYLOAD:
        return None
    try:
        version, n = struct.unpack_from("<BH", payload)
        if version != _CACHE_VERSION:
            raise CorruptPayload(f"cache record version {version}")
        events_s, lens_s = _structs(n)
        events = events_s.unpack_from(payload, 3)
        offset = 3 + events_s.size
        lens = lens_s.unpack_from(payload, offset)
        offset += lens_s.size
    except struct.error as exc:
        raise CorruptPayload(str(exc)) from None
    if offset + sum(lens) != len(payload):
        raise CorruptPayload("cache record length mismatch")
    return Record(events, blob=payload[offset:], lens=lens)


# Python objects -> Values (batch and streaming ingestion, demo data).


def to_value(value_type: int, obj: Any) -> Value:
    """A Value of `value_type` holding `obj` (a Python or Arrow-converted object).

    Raises:
        ValueError: `obj` cannot be represented as that type (the message says why).
    """
    if obj is None:
        raise ValueError("is null")
    if value_type in (VT.VALUE_TYPE_FLOAT, VT.VALUE_TYPE_DOUBLE):
        if isinstance(obj, bool) or not isinstance(obj, int | float):
            raise ValueError(f"{obj!r} is not a number")
        if value_type == VT.VALUE_TYPE_FLOAT:
            return Value(float_value=float(obj))
        return Value(double_value=float(obj))
    if value_type == VT.VALUE_TYPE_INT64:
        if isinstance(obj, float) and obj.is_integer():
            obj = int(obj)
        if isinstance(obj, bool) or not isinstance(obj, int) or not -(2**63) <= obj <= _INT64_MAX:
            raise ValueError(f"{obj!r} is not a 64-bit integer")
        return Value(int64_value=obj)
    if value_type == VT.VALUE_TYPE_STRING:
        if not isinstance(obj, str):
            raise ValueError(f"{obj!r} is not a string")
        return Value(string_value=obj)
    if value_type == VT.VALUE_TYPE_BYTES:
        if not isinstance(obj, bytes | bytearray):
            raise ValueError(f"{obj!r} is not bytes")
        return Value(bytes_value=bytes(obj))
    if value_type == VT.VALUE_TYPE_BOOL:
        if not isinstance(obj, bool | int) or obj not in (0, 1):
            raise ValueError(f"{obj!r} is not a boolean")
        return Value(bool_value=bool(obj))
    if value_type in (VT.VALUE_TYPE_FLOAT_LIST, VT.VALUE_TYPE_DOUBLE_LIST):
        items = list(obj)
        if any(isinstance(x, bool) or not isinstance(x, int | float) for x in items):
            raise ValueError(f"{obj!r} is not a list of numbers")
        if value_type == VT.VALUE_TYPE_FLOAT_LIST:
            return Value(float_list_value=value_pb2.FloatList(values=items))
        return Value(double_list_value=value_pb2.DoubleList(values=items))
    if value_type == VT.VALUE_TYPE_INT64_LIST:
        items = list(obj)
        if any(isinstance(x, bool) or not isinstance(x, int) for x in items):
            raise ValueError(f"{obj!r} is not a list of integers")
        return Value(int64_list_value=value_pb2.Int64List(values=items))
    if value_type == VT.VALUE_TYPE_STRING_LIST:
        items = list(obj)
        if any(not isinstance(x, str) for x in items):
            raise ValueError(f"{obj!r} is not a list of strings")
        return Value(string_list_value=value_pb2.StringList(values=items))
    raise ValueError(f"unsupported type {type_name(value_type)}")
