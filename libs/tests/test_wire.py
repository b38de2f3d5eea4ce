"""Golden tests of the wire writers: their bytes equal what the generated classes serialize."""

from __future__ import annotations

import pytest
from google.protobuf import timestamp_pb2

from infergrid.features.v1 import features_pb2
from infergrid.logging.v1 import logging_pb2
from infergrid.types.v1 import value_pb2
from libs.wire import frame, length_delimited, read_varint, tag, varint, wire_problem

Vector = features_pb2.GetOnlineFeaturesResponse.FeatureVector
_INT64_CASES = [0, 1, 127, 128, 300, 16383, 16384, 2**31, 2**63 - 1, -1, -300, -(2**63)]


@pytest.mark.parametrize("n", _INT64_CASES)
def test_varint_is_protobufs_int64_encoding(n: int) -> None:
    # A packed repeated int64 with one entry: its tag, the varint's length, the varint.
    golden = value_pb2.Int64List(values=[n]).SerializeToString()
    assert frame(tag(value_pb2.Int64List.DESCRIPTOR.fields_by_name["values"]), varint(n)) == golden
    if n >= 0:
        assert read_varint(varint(n), 0) == (n, len(varint(n)))
    else:
        assert read_varint(varint(n), 0) == (n + 2**64, 10)


def test_varint_tag_of_a_singular_field() -> None:
    seconds = timestamp_pb2.Timestamp.DESCRIPTOR.fields_by_name["seconds"]
    nanos = timestamp_pb2.Timestamp.DESCRIPTOR.fields_by_name["nanos"]
    golden = timestamp_pb2.Timestamp(seconds=-5, nanos=999).SerializeToString()
    assert tag(seconds) + varint(-5) + tag(nanos) + varint(999) == golden


def test_frame_of_a_message_field() -> None:
    value = value_pb2.Value(string_value="x" * 200)  # a two-byte length
    raw = value.SerializeToString()
    assert (
        frame(tag(Vector.DESCRIPTOR.fields_by_name["values"]), raw)
        == Vector(values=[value]).SerializeToString()
    )


def test_packed_repeated_enum() -> None:
    statuses = [features_pb2.FEATURE_STATUS_PRESENT, features_pb2.FEATURE_STATUS_EXPIRED] * 70
    golden = Vector(statuses=statuses).SerializeToString()
    assert frame(tag(Vector.DESCRIPTOR.fields_by_name["statuses"]), bytes(statuses)) == golden


def test_fixed32_and_map_entry_tags() -> None:
    float_tag = tag(value_pb2.Value.DESCRIPTOR.fields_by_name["float_value"])
    assert float_tag + bytes(4) == value_pb2.Value(float_value=0.0).SerializeToString()
    record = logging_pb2.InferenceLogRecord()
    record.features["age"].float_value = 1.5
    field = logging_pb2.InferenceLogRecord.DESCRIPTOR.fields_by_name["features"]
    entry = field.message_type.fields_by_name
    value = record.features["age"].SerializeToString()
    built = frame(tag(field), frame(tag(entry["key"]), b"age") + frame(tag(entry["value"]), value))
    assert built == record.SerializeToString()
    assert wire_problem(logging_pb2.InferenceLogRecord.DESCRIPTOR, built) == ""


def test_length_delimited_yields_the_top_level_strings_and_skips_the_rest() -> None:
    parts = [
        value_pb2.Value(float_value=1.5),
        value_pb2.Value(string_value="ab"),
        value_pb2.Value(double_value=2.5),
        value_pb2.Value(int64_value=-7),
        value_pb2.Value(bytes_value=b"\x00c"),
    ]
    data = b"".join(p.SerializeToString() for p in parts)  # one message, its fields in this order
    number = value_pb2.Value.DESCRIPTOR.fields_by_name
    got = [(n, data[start:end]) for n, start, end in length_delimited(data)]
    assert got == [(number["string_value"].number, b"ab"), (number["bytes_value"].number, b"\x00c")]
    seen = []
    with pytest.raises(ValueError):
        for n, _, _ in length_delimited(data[:-1]):  # the last field cut short: yielded, then refused
            seen.append(n)
    assert seen == [number["string_value"].number, number["bytes_value"].number]
