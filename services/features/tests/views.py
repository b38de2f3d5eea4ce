"""Feature views and values used by the features tests (unit and integration)."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration

from infergrid.features.v1 import features_pb2 as pb
from infergrid.types.v1 import value_pb2

VT = value_pb2.ValueType
V = value_pb2.Value

ALL_TYPES: dict[str, tuple[int, V]] = {
    "f_float": (VT.VALUE_TYPE_FLOAT, V(float_value=1.5)),
    "f_double": (VT.VALUE_TYPE_DOUBLE, V(double_value=2.000000000001)),
    "f_int64": (VT.VALUE_TYPE_INT64, V(int64_value=-(2**62))),
    "f_string": (VT.VALUE_TYPE_STRING, V(string_value="héllo")),
    "f_bytes": (VT.VALUE_TYPE_BYTES, V(bytes_value=b"\x00\xffbin")),
    "f_bool": (VT.VALUE_TYPE_BOOL, V(bool_value=False)),
    "f_floats": (VT.VALUE_TYPE_FLOAT_LIST, V(float_list_value=value_pb2.FloatList(values=[0.5, -1.0, 3.25]))),
}


def typed_view(name: str = "typed", ttl_s: int = 0, key_type: int = VT.VALUE_TYPE_STRING) -> pb.FeatureView:
    """A view with one feature of every type, keyed by `id`."""
    return pb.FeatureView(
        name=name,
        entity=pb.Entity(name="thing", key_columns=[pb.EntityKeyColumn(name="id", type=key_type)]),
        features=[pb.FeatureSpec(name=n, type=t) for n, (t, _) in ALL_TYPES.items()],
        ttl=Duration(seconds=ttl_s),
        description="every type",
        owner="tests",
    )


def string_keys(*ids: str) -> value_pb2.ValueList:
    return value_pb2.ValueList(values=[V(string_value=i) for i in ids])


def typed_row(entity: str, ts_s: float | None = None, **values: V) -> pb.FeatureRow:
    """A row of entity `entity` with `values`, by default one of every type, at `ts_s` (None: unset)."""
    row = pb.FeatureRow(
        entity_key={"id": V(string_value=entity)}, values=values or {n: v for n, (_, v) in ALL_TYPES.items()}
    )
    if ts_s is not None:
        row.event_timestamp.FromMicroseconds(round(ts_s * 1e6))
    return row
