"""The hand-written wire encoding of GetOnlineFeaturesResponse parses to what the message API would build."""

from __future__ import annotations

import random

import pytest
from google.protobuf.duration_pb2 import Duration

from infergrid.features.v1 import features_pb2 as pb
from libs.wire import frame
from services.features import codec, response
from services.features.codec import MISSING, Record
from services.features.online import Plan, ReadResult
from services.features.registry import View
from services.features.tests.views import ALL_TYPES, VT, V

NOW_US = 1_800_000_000_000_000


def _view(name: str, types: list[int], ttl_s: int) -> View:
    return View.compile(
        pb.FeatureView(
            name=name,
            entity=pb.Entity(
                name="e", key_columns=[pb.EntityKeyColumn(name="id", type=VT.VALUE_TYPE_STRING)]
            ),
            features=[pb.FeatureSpec(name=f"f{i}", type=t) for i, t in enumerate(types)],
            ttl=Duration(seconds=ttl_s),
        )
    )


def _expected(
    view: View, recs: list[Record | None], values: list[list[V | None]], index: int
) -> pb.GetOnlineFeaturesResponse.FeatureVector:
    vector = pb.GetOnlineFeaturesResponse.FeatureVector()
    cutoff = NOW_US - view.ttl_us if view.ttl_us else -(2**63)
    for rec, vals in zip(recs, values, strict=True):
        stamp = vector.event_timestamps.add()
        if rec is None or index >= len(rec.events) or rec.events[index] == MISSING:
            vector.values.add()
            vector.statuses.append(pb.FEATURE_STATUS_NOT_FOUND)
            continue
        stamp.FromMicroseconds(rec.events[index])
        if rec.events[index] < cutoff:
            vector.values.add()
            vector.statuses.append(pb.FEATURE_STATUS_EXPIRED)
        else:
            vector.values.add().CopyFrom(vals[index])
            vector.statuses.append(pb.FEATURE_STATUS_PRESENT)
    return vector


def _rows(
    n: int, types: list[int], *, uniform: bool, holes: bool, rng: random.Random
) -> tuple[list[Record | None], list[list[V | None]]]:
    samples = {t: v for t, v in ALL_TYPES.values()}
    recs: list[Record | None] = []
    values: list[list[V | None]] = []
    for _ in range(n):
        if holes and rng.random() < 0.1:
            recs.append(None)
            values.append([None] * len(types))
            continue
        base = NOW_US - (rng.choice([10, 10_000_000_000]) if holes else 10)
        vals = [V(float_value=rng.random()) if t == VT.VALUE_TYPE_FLOAT else samples[t] for t in types]
        events = [base if uniform else base - i for i in range(len(types))]
        if holes and rng.random() < 0.2:
            events[0] = MISSING
        width = len(types) if not holes or rng.random() < 0.8 else len(types) - 1
        recs.append(Record(events[:width], [codec.value_frame(v.SerializeToString()) for v in vals[:width]]))
        values.append(vals)
    return recs, values


@pytest.mark.parametrize("n", [1, 3, 20, 100])
@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("holes", [True, False])
@pytest.mark.parametrize("stale", [True, False])
def test_encoding_matches_the_message_api(n: int, uniform: bool, holes: bool, stale: bool) -> None:
    rng = random.Random(n * 7 + uniform + 2 * holes)
    floats = _view("floats", [VT.VALUE_TYPE_FLOAT] * 6, ttl_s=60)
    mixed = _view("mixed", [t for t, _ in ALL_TYPES.values()], ttl_s=0)
    rows: dict[str, list[Record | None]] = {}
    values: dict[str, list[list[V | None]]] = {}
    for view in (floats, mixed):
        types = list(view.feature_types)
        rows[view.name], values[view.name] = _rows(n, types, uniform=uniform, holes=holes, rng=rng)
    columns = [(floats, 5), (mixed, 0), (floats, 0), (mixed, 6), (floats, 2)]
    refs = tuple(f"{v.name}:f{i}" for v, i in columns)
    plan = Plan(
        refs,
        tuple(columns),
        (floats, mixed),
        b"".join(frame(codec.FEATURE_NAMES_TAG, r.encode()) for r in refs),
    )
    got = pb.GetOnlineFeaturesResponse.FromString(response.encode(ReadResult(plan, rows, n, NOW_US, stale)))
    assert list(got.feature_names) == list(refs)
    assert got.possibly_stale == stale
    for (view, index), vector in zip(columns, got.results, strict=True):
        assert vector == _expected(view, rows[view.name], values[view.name], index), (view.name, index)
