"""FeatureService over a real gRPC channel, with in-memory fakes of the store, view store and cache."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from infergrid.features.v1 import features_pb2 as pb
from infergrid.features.v1 import features_pb2_grpc
from infergrid.types.v1 import value_pb2
from libs.testing import assert_bad_config_exits, assert_serves
from services.features.config import FeaturesConfig, FeaturesServerConfig, LimitsConfig
from services.features.errors import InvalidArgument
from services.features.server import SERVICE_NAME, create_server
from services.features.tests.fakes import InMemoryCache, InMemoryOnlineStore, InMemoryViewStore
from services.features.tests.views import ALL_TYPES, VT, V, string_keys, typed_row, typed_view

OK = pb.FEATURE_STATUS_PRESENT
NOT_FOUND = pb.FEATURE_STATUS_NOT_FOUND
EXPIRED = pb.FEATURE_STATUS_EXPIRED


@dataclass
class Harness:
    stub: features_pb2_grpc.FeatureServiceStub
    store: InMemoryOnlineStore
    cache: InMemoryCache
    port: int

    def apply(self, view: pb.FeatureView) -> Any:
        """The ApplyFeatureView call of `view`."""
        return self.stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=view))

    def write(self, view: str, *rows: pb.FeatureRow) -> Any:
        """The WriteFeatures call of `rows` to `view`."""
        return self.stub.WriteFeatures(pb.WriteFeaturesRequest(feature_view=view, rows=rows))


@pytest.fixture(params=["threaded", "aio"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    store, cache = InMemoryOnlineStore(), InMemoryCache()
    config = FeaturesConfig(
        server=FeaturesServerConfig(port=0, transport=request.param),
        limits=LimitsConfig(max_entities_per_request=50),
    )
    server = await create_server(config, store=store, view_store=InMemoryViewStore(), cache=cache)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield Harness(features_pb2_grpc.FeatureServiceStub(channel), store, cache, server.port)
    finally:
        await server.stop(0, 0.5)


async def test_serves_health_and_reflection(harness: Harness) -> None:
    await assert_serves(f"127.0.0.1:{harness.port}", SERVICE_NAME)


def test_malformed_port_exits_naming_the_variable() -> None:
    assert_bad_config_exits("services.features", "INFERGRID_FEATURES_PORT", "not-a-port")


async def _fails(call: object, code: grpc.StatusCode, *words: str) -> str:
    """Awaits `call`, which must fail with `code` and details that name each of `words`; the details."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    details = info.value.details() or ""
    assert info.value.code() == code and all(w in details for w in words), (info.value.code(), details)
    return details


def _read(*refs: str, **entities: value_pb2.ValueList) -> pb.GetOnlineFeaturesRequest:
    """A read of `refs` (default typed:f_float) for `entities` (default id: "a")."""
    return pb.GetOnlineFeaturesRequest(
        features=refs or ["typed:f_float"], entities=entities or {"id": string_keys("a")}
    )


async def test_round_trips_every_type(harness: Harness) -> None:
    reply = await harness.apply(typed_view())
    assert reply.created and reply.feature_view.revision == 1
    written = await harness.write("typed", typed_row("a", ts_s=1_700_000_000.25))
    assert written.rows_written == 1
    refs = [f"typed:{n}" for n in ALL_TYPES]
    read = _read(*refs, id=string_keys("a", "missing", "a"))
    got = await harness.stub.GetOnlineFeatures(read)
    assert list(got.feature_names) == refs
    assert not got.possibly_stale
    for (name, (_, value)), vector in zip(ALL_TYPES.items(), got.results, strict=True):
        assert list(vector.statuses) == [OK, NOT_FOUND, OK], name
        assert vector.values[0] == value and vector.values[2] == value, name
        assert vector.values[1] == V()
        assert vector.event_timestamps[0].ToNanoseconds() == 1_700_000_000_250_000_000
    # The second read is answered by the cache, identically.
    reads = harness.store.reads
    again = await harness.stub.GetOnlineFeatures(read)
    assert again == got
    assert harness.store.reads == reads


async def test_write_is_visible_through_the_cache(harness: Harness) -> None:
    await harness.apply(typed_view())
    request = _read("typed:f_int64", id=string_keys("b"))
    first = await harness.stub.GetOnlineFeatures(request)
    assert list(first.results[0].statuses) == [NOT_FOUND]  # now negatively cached
    await harness.write(
        "typed", pb.FeatureRow(entity_key={"id": V(string_value="b")}, values={"f_int64": V(int64_value=7)})
    )
    second = await harness.stub.GetOnlineFeatures(request)
    assert list(second.results[0].statuses) == [OK]
    assert second.results[0].values[0].int64_value == 7


async def test_keys_given_as_strings_are_read_as_the_views_key_type(harness: Harness) -> None:
    view = typed_view("numbered", key_type=VT.VALUE_TYPE_INT64)
    await harness.apply(view)
    await harness.write(
        "numbered", pb.FeatureRow(entity_key={"id": V(int64_value=42)}, values={"f_int64": V(int64_value=7)})
    )
    got = await harness.stub.GetOnlineFeatures(_read("numbered:f_int64", id=string_keys("42", "43")))
    assert list(got.results[0].statuses) == [OK, NOT_FOUND]
    assert got.results[0].values[0].int64_value == 7
    await _fails(
        harness.stub.GetOnlineFeatures(_read("numbered:f_int64", id=string_keys("4x"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "entities.id: expected an integer, got '4x'",
    )


async def test_expired_value_is_reported_expired(harness: Harness) -> None:
    await harness.apply(typed_view("short", ttl_s=60))
    await harness.write("short", typed_row("old", ts_s=time.time() - 3600), typed_row("new"))
    got = await harness.stub.GetOnlineFeatures(_read("short:f_float", id=string_keys("old", "new")))
    assert list(got.results[0].statuses) == [EXPIRED, OK]
    assert got.results[0].values[0] == V()
    assert got.results[0].values[1].float_value == 1.5


async def test_evolution_adds_features_and_refuses_type_and_key_changes(harness: Harness) -> None:
    view = typed_view()
    await harness.apply(view)
    await harness.write("typed", typed_row("a"))
    # Cached before the view grows.
    await harness.stub.GetOnlineFeatures(_read(id=string_keys("a")))
    view.features.add(name="added", type=VT.VALUE_TYPE_INT64)
    reply = await harness.apply(view)
    assert not reply.created and reply.feature_view.revision == 2
    assert [f.name for f in reply.feature_view.features][-1] == "added"
    got = await harness.stub.GetOnlineFeatures(_read("typed:added", "typed:f_float", id=string_keys("a")))
    assert list(got.results[0].statuses) == [NOT_FOUND]
    assert list(got.results[1].statuses) == [OK]
    # Same definition again: nothing changes.
    same = await harness.apply(view)
    assert same.feature_view.revision == 2

    retyped = pb.FeatureView()
    retyped.CopyFrom(view)
    retyped.features[0].type = VT.VALUE_TYPE_STRING
    for changed, words in (
        (retyped, "'f_float' is FLOAT and cannot become STRING"),
        (typed_view(key_type=VT.VALUE_TYPE_INT64), "entity key cannot change"),
    ):
        await _fails(harness.apply(changed), grpc.StatusCode.FAILED_PRECONDITION, words)


async def test_get_and_list_views(harness: Harness) -> None:
    for name in ("b_view", "a_view", "c_view"):
        await harness.apply(typed_view(name))
    got = await harness.stub.GetFeatureView(pb.GetFeatureViewRequest(name="a_view"))
    assert got.owner == "tests" and got.created_time.seconds > 0
    page = await harness.stub.ListFeatureViews(pb.ListFeatureViewsRequest(page_size=2))
    assert [v.name for v in page.feature_views] == ["a_view", "b_view"] and page.next_page_token
    rest = await harness.stub.ListFeatureViews(
        pb.ListFeatureViewsRequest(page_size=2, page_token=page.next_page_token)
    )
    assert [v.name for v in rest.feature_views] == ["c_view"] and not rest.next_page_token
    await _fails(
        harness.stub.GetFeatureView(pb.GetFeatureViewRequest(name="nope")), grpc.StatusCode.NOT_FOUND
    )


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (_read("nope:x"), "NOT_FOUND", "'nope'"),
        (_read("typed:nope"), "NOT_FOUND", "'nope'"),
        (
            pb.GetOnlineFeaturesRequest(features=[], entities={"id": string_keys("a")}),
            "INVALID_ARGUMENT",
            "features",
        ),
        (_read("typed"), "INVALID_ARGUMENT", "'view:feature'"),
        (
            pb.GetOnlineFeaturesRequest(features=["typed:f_float"], entities={}),
            "INVALID_ARGUMENT",
            "entities",
        ),
        (_read(id=string_keys()), "INVALID_ARGUMENT", "no rows"),
        (_read(id=string_keys(*map(str, range(51)))), "INVALID_ARGUMENT", "at most 50"),
        (
            _read(id=string_keys("a", "b"), other=string_keys("x", "y")),
            "INVALID_ARGUMENT",
            "'other' is not a key column",
        ),
        (
            _read(id=value_pb2.ValueList(values=[V(string_value="a"), V(int64_value=3)])),
            "INVALID_ARGUMENT",
            "entities['id'][1]: expected STRING, got INT64",
        ),
        (_read("typed'; DROP TABLE feature_values; --:x"), "NOT_FOUND", "DROP TABLE"),
        (_read(id=string_keys("x" * 2000)), "INVALID_ARGUMENT", "at most 1024"),
    ],
)
async def test_bad_reads_name_the_problem(
    harness: Harness, request_: pb.GetOnlineFeaturesRequest, code: str, words: str
) -> None:
    await harness.apply(typed_view())
    await _fails(harness.stub.GetOnlineFeatures(request_), grpc.StatusCode[code], words)


async def test_crafted_entity_keys_are_data(harness: Harness) -> None:
    await harness.apply(typed_view())
    crafted = "a' OR '1'='1"
    got = await harness.stub.GetOnlineFeatures(_read(id=string_keys(crafted)))
    assert list(got.results[0].statuses) == [NOT_FOUND]


@pytest.mark.parametrize(
    ("key", "values", "code", "words"),
    [
        (V(string_value="a"), {"nope": V(float_value=1)}, "NOT_FOUND", "'nope'"),
        (V(int64_value=1), {"f_float": V(float_value=1)}, "INVALID_ARGUMENT", "expected STRING, got INT64"),
        (
            V(string_value="a"),
            {"f_float": V(string_value="1")},
            "INVALID_ARGUMENT",
            "rows[0].values['f_float']: expected FLOAT, got STRING",
        ),
        (None, {"f_float": V(float_value=1)}, "INVALID_ARGUMENT", "'id' is missing"),
        (V(string_value="a"), {}, "INVALID_ARGUMENT", "at least one feature"),
    ],
)
async def test_bad_writes_name_the_problem(
    harness: Harness, key: V | None, values: dict[str, V], code: str, words: str
) -> None:
    await harness.apply(typed_view())
    row = pb.FeatureRow(entity_key={} if key is None else {"id": key}, values=values)
    await _fails(harness.write("typed", row), grpc.StatusCode[code], words)


async def test_bad_views_are_refused(harness: Harness) -> None:
    for bad, words in (
        (typed_view("x; DROP KEYSPACE infergrid"), "feature_view.name"),
        (typed_view(key_type=VT.VALUE_TYPE_FLOAT), "must be STRING, INT64 or BYTES"),
    ):
        await _fails(harness.apply(bad), grpc.StatusCode.INVALID_ARGUMENT, words)


async def test_store_down_serves_cache_as_possibly_stale_and_fails_misses_fast(harness: Harness) -> None:
    await harness.apply(typed_view())
    await harness.write("typed", typed_row("hot"))
    hot = _read(id=string_keys("hot"))
    assert not (await harness.stub.GetOnlineFeatures(hot)).possibly_stale
    harness.store.down = True
    cold = _read(id=string_keys("cold"))
    for _ in range(8):
        started = time.perf_counter()
        await _fails(harness.stub.GetOnlineFeatures(cold), grpc.StatusCode.UNAVAILABLE)
        assert time.perf_counter() - started < 1.0
    served = await harness.stub.GetOnlineFeatures(hot)
    assert served.possibly_stale and list(served.results[0].statuses) == [OK]
    harness.store.down = False
    # Recovery: the breaker half-opens after its reset time and the next miss closes it.
    deadline = time.monotonic() + 10
    while True:
        try:
            got = await harness.stub.GetOnlineFeatures(cold)
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    assert list(got.results[0].statuses) == [NOT_FOUND]
    assert not (await harness.stub.GetOnlineFeatures(hot)).possibly_stale


# Feature writes trust nothing (issue 14, item 7): every bad write is INVALID_ARGUMENT naming the field,
# the batch is refused whole, and nothing reaches the store.


def _finite_view(allow: bool = False) -> pb.FeatureView:
    view = typed_view("finite")
    view.features.append(pb.FeatureSpec(name="ratio", type=VT.VALUE_TYPE_DOUBLE, allow_non_finite=allow))
    view.features.append(pb.FeatureSpec(name="doubles", type=VT.VALUE_TYPE_DOUBLE_LIST))
    return view


async def _refused(harness: Harness, rows: list[pb.FeatureRow], view: str = "finite") -> str:
    before = dict(harness.store.rows)
    details = await _fails(harness.write(view, *rows), grpc.StatusCode.INVALID_ARGUMENT)
    assert dict(harness.store.rows) == before, "a refused batch wrote something"
    return details


def _row(entity: str, ts_s: float | None = None, **values: V) -> pb.FeatureRow:
    return typed_row(entity, ts_s, **(values or {"f_int64": V(int64_value=1)}))


async def test_event_times_are_bounded(harness: Harness) -> None:
    await harness.apply(_finite_view())
    now = time.time()
    # A minute ahead (clock skew) is accepted; an hour ahead, or before 2000, is not.
    await harness.write("finite", _row("a", now + 60))
    details = await _refused(harness, [_row("b", now), _row("c", now), _row("d", now + 3600)])
    assert details.startswith("rows[2].event_timestamp: ") and "in the future" in details
    assert "rows[0].event_timestamp" in await _refused(harness, [_row("e", 100.0)])
    assert "before the earliest" in await _refused(harness, [_row("e", -1e9)])
    # Out of every range: Cassandra's microseconds, Timestamp's own, malformed nanos.
    far = _row("f")
    far.event_timestamp.seconds = 2**62
    assert "rows[0].event_timestamp" in await _refused(harness, [far])
    far.event_timestamp.seconds = -(2**62)
    assert "rows[0].event_timestamp" in await _refused(harness, [far])
    bad_nanos = _row("g")
    bad_nanos.event_timestamp.seconds = int(now)
    bad_nanos.event_timestamp.nanos = -5
    assert "rows[0].event_timestamp: nanos" in await _refused(harness, [bad_nanos])


async def test_nan_and_infinities_need_allow_non_finite(harness: Harness) -> None:
    await harness.apply(_finite_view())
    cases = {
        "f_float": V(float_value=float("nan")),
        "f_double": V(double_value=float("inf")),
        "f_floats": V(float_list_value=value_pb2.FloatList(values=[1.0, float("-inf")])),
        "doubles": V(double_list_value=value_pb2.DoubleList(values=[float("nan")])),
        "ratio": V(double_value=float("-inf")),
    }
    for name, value in cases.items():
        details = await _refused(harness, [_row("a"), _row("b", **{name: value})])
        assert details.startswith(f"rows[1].values[{name!r}]"), details
        assert "allow_non_finite" in details
    assert "values['f_floats'][1]" in await _refused(harness, [_row("a", f_floats=cases["f_floats"])])
    # Declared: the feature may hold them.
    await harness.apply(_finite_view(allow=True))
    await harness.write("finite", _row("nan", ratio=V(double_value=float("nan"))))
    got = await harness.stub.GetOnlineFeatures(_read("finite:ratio", id=string_keys("nan")))
    assert got.results[0].statuses[0] == OK and got.results[0].values[0].double_value != 0


async def test_a_non_finite_default_value_is_refused(harness: Harness) -> None:
    view = _finite_view()
    view.features[-2].default_value.double_value = float("nan")
    await _fails(harness.apply(view), grpc.StatusCode.INVALID_ARGUMENT, "'ratio'")
    view.features[-2].allow_non_finite = True
    await harness.apply(view)


async def test_bad_writes_never_open_the_breaker_that_guards_reads(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    await harness.apply(_finite_view())
    await harness.write("finite", _row("a"))
    failures = FeaturesConfig().store.store_breaker_failures
    # Refused before the store is called...
    for _ in range(3 * failures):
        await _refused(harness, [_row("x", time.time() + 86_400)])
        await _refused(harness, [_row("x", f_double=V(double_value=float("nan")))])

    # ...and when the store itself blames the request (store.py maps Cassandra's InvalidRequest so).
    async def refuse(view: object, rows: object) -> None:
        raise InvalidArgument("rows: the store refused the write: out of bound timestamp")

    monkeypatch.setattr(harness.store, "write", refuse)
    for _ in range(3 * failures):
        assert "out of bound" in await _refused(harness, [_row("y")])
    got = await harness.stub.GetOnlineFeatures(_read("finite:f_int64", id=string_keys("a", "zz")))
    assert list(got.results[0].statuses) == [OK, NOT_FOUND] and not got.possibly_stale
