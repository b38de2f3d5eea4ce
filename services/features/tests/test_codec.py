"""Encodings: wire frames parse as protobuf, cache records round-trip, Python values convert by type."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from infergrid.features.v1 import features_pb2 as pb
from services.features import codec
from services.features.codec import MISSING, Record
from services.features.tests.views import ALL_TYPES, VT


@pytest.mark.parametrize("event_us", [0, 1, 1_700_000_000_123_456, -1_500_000, 2**40])
def test_timestamp_frames_parse(event_us: int) -> None:
    vector = pb.GetOnlineFeaturesResponse.FeatureVector.FromString(codec.ts_frame(event_us))
    assert vector.event_timestamps[0].ToMicroseconds() == event_us
    stamp = Timestamp()
    stamp.FromMicroseconds(event_us)
    golden = pb.GetOnlineFeaturesResponse.FeatureVector(event_timestamps=[stamp]).SerializeToString()
    assert codec.ts_frame(event_us) == golden


def test_value_frames_and_records_round_trip() -> None:
    raw = [v.SerializeToString() for _, v in ALL_TYPES.values()]
    record = Record([5, MISSING, *range(len(raw) - 2)], [codec.value_frame(r) for r in raw])
    assert codec.decode_record(codec.encode_record(record)) == record
    assert codec.decode_record(codec.encode_record(None)) is None
    assert not record.complete and record.min_event == 0
    vector = pb.GetOnlineFeaturesResponse.FeatureVector.FromString(b"".join(record.frames))
    golden = pb.GetOnlineFeaturesResponse.FeatureVector(values=[v for _, v in ALL_TYPES.values()])
    assert b"".join(codec.value_frame(r) for r in raw) == golden.SerializeToString()
    assert [v for v in vector.values] == [v for _, v in ALL_TYPES.values()]
    with pytest.raises(codec.CorruptPayload):
        codec.decode_record(codec.encode_record(record)[:-1])
    with pytest.raises(codec.CorruptPayload):
        codec.decode_record(b"\x09\x00")


def test_to_value_checks_types() -> None:
    for _name, (value_type, value) in ALL_TYPES.items():
        field = value.WhichOneof("kind")
        python = getattr(value, field)
        if value_type == VT.VALUE_TYPE_FLOAT_LIST:
            python = list(python.values)
        assert codec.to_value(value_type, python) == value
    assert codec.to_value(VT.VALUE_TYPE_INT64, 3.0).int64_value == 3
    for value_type, bad in [
        (VT.VALUE_TYPE_INT64, 3.5),
        (VT.VALUE_TYPE_INT64, True),
        (VT.VALUE_TYPE_FLOAT, "1"),
        (VT.VALUE_TYPE_STRING, 1),
        (VT.VALUE_TYPE_BOOL, 2),
        (VT.VALUE_TYPE_FLOAT_LIST, ["a"]),
        (VT.VALUE_TYPE_FLOAT, None),
    ]:
        with pytest.raises(ValueError):
            codec.to_value(value_type, bad)


def test_keys_are_unambiguous() -> None:
    assert codec.join_key([b"ab"]) == b"ab"
    assert codec.join_key([b"a", b"bc"]) != codec.join_key([b"ab", b"c"])
    assert codec.key_part(codec.Value(int64_value=-1), VT.VALUE_TYPE_INT64) == b"\xff" * 8
    assert codec.key_part(codec.Value(string_value="x"), VT.VALUE_TYPE_INT64) is None


def test_keys_given_as_strings_take_the_columns_declared_type() -> None:
    as_int = codec.key_part(codec.Value(int64_value=-42), VT.VALUE_TYPE_INT64)
    assert codec.key_part(codec.Value(string_value="-42"), VT.VALUE_TYPE_INT64) == as_int
    assert codec.key_part(codec.Value(string_value="héllo"), VT.VALUE_TYPE_BYTES) == "héllo".encode()
    for bad in ("", " 1", "1.0", "4_2", str(2**63)):
        assert codec.key_part(codec.Value(string_value=bad), VT.VALUE_TYPE_INT64) is None, bad


def test_cassandra_ttl_keeps_expired_values_for_the_retention() -> None:
    from services.features.store import cassandra_ttl

    now = 1_000_000_000_000_000
    assert cassandra_ttl(0, now, now, 86_400) == 0
    assert cassandra_ttl(60_000_000, now, now, 100) == 160
    assert cassandra_ttl(60_000_000, now - 3_600_000_000, now, 100) == 100


def test_cassandra_ttl_never_sends_a_ttl_cassandra_would_refuse() -> None:
    from services.features.store import cassandra_ttl

    now = 1_800_000_000 * 1_000_000  # 2027
    year_us = 365 * 86_400 * 1_000_000
    assert cassandra_ttl(5 * year_us, now, now, 0) == 5 * 365 * 86_400
    # Past 2038 (Cassandra's latest expiration unless storage_compatibility_mode is NONE): no TTL,
    # reads still apply the view's; over 20 years: refused by every Cassandra, so none either.
    assert cassandra_ttl(15 * year_us, now, now, 0) == 0
    assert cassandra_ttl(15 * year_us, now, now, 0, max_expiration_s=4_294_967_294) == 15 * 365 * 86_400
    assert cassandra_ttl(21 * year_us, now, now, 0, max_expiration_s=4_294_967_294) == 0
