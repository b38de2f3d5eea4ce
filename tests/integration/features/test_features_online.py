"""FeatureService against real Cassandra and Redis: types, expiry, evolution, cache visibility, bad input."""

from __future__ import annotations

import dataclasses
import time
import uuid

import grpc
import pytest
import redis
from cassandra.cluster import Cluster

from infergrid.features.v1 import features_pb2 as pb
from infergrid.features.v1 import features_pb2_grpc
from libs.testing import wait_serving
from services.features.config import FeaturesConfig
from services.features.server import SERVICE_NAME, create_server
from services.features.tests.views import ALL_TYPES, VT, V, string_keys, typed_row, typed_view
from stack.cassandra import Cassandra
from stack.redis import Redis

pytestmark = pytest.mark.integration

OK = pb.FEATURE_STATUS_PRESENT
NOT_FOUND = pb.FEATURE_STATUS_NOT_FOUND
EXPIRED = pb.FEATURE_STATUS_EXPIRED
Stub = features_pb2_grpc.FeatureServiceStub


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def test_apply_write_read_round_trips_every_type(features_stub: Stub) -> None:
    view = _name("typed")
    assert (
        await features_stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=typed_view(view)))
    ).created
    await features_stub.WriteFeatures(
        pb.WriteFeaturesRequest(
            feature_view=view, rows=[typed_row("a", ts_s=1_700_000_000.5), typed_row("b")]
        )
    )
    refs = [f"{view}:{n}" for n in ALL_TYPES]
    request = pb.GetOnlineFeaturesRequest(features=refs, entities={"id": string_keys("a", "zz", "b")})
    for attempt in ("store", "cache"):
        got = await features_stub.GetOnlineFeatures(request)
        assert list(got.feature_names) == refs
        for (name, (_, value)), vector in zip(ALL_TYPES.items(), got.results, strict=True):
            assert list(vector.statuses) == [OK, NOT_FOUND, OK], (attempt, name)
            assert vector.values[0] == value and vector.values[2] == value, (attempt, name)
            assert vector.values[1] == V()
            assert vector.event_timestamps[0].ToMicroseconds() == 1_700_000_000_500_000


async def test_expired_value_is_expired_and_missing_entity_not_found(features_stub: Stub) -> None:
    view = _name("short")
    await features_stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=typed_view(view, ttl_s=30)))
    await features_stub.WriteFeatures(
        pb.WriteFeaturesRequest(
            feature_view=view, rows=[typed_row("old", ts_s=time.time() - 300), typed_row("new")]
        )
    )
    got = await features_stub.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(
            features=[f"{view}:f_double"], entities={"id": string_keys("old", "new", "never")}
        )
    )
    assert list(got.results[0].statuses) == [EXPIRED, OK, NOT_FOUND]
    assert got.results[0].values[0] == V() and got.results[0].values[1].double_value == 2.000000000001


async def test_a_write_is_visible_on_the_next_read_through_the_cache(
    features_stub: Stub, features_config: FeaturesConfig, redis_server: Redis
) -> None:
    view = _name("fresh")
    await features_stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=typed_view(view)))
    request = pb.GetOnlineFeaturesRequest(features=[f"{view}:f_int64"], entities={"id": string_keys("u")})

    def write(n: int) -> pb.WriteFeaturesRequest:
        return pb.WriteFeaturesRequest(
            feature_view=view,
            rows=[
                pb.FeatureRow(entity_key={"id": V(string_value="u")}, values={"f_int64": V(int64_value=n)})
            ],
        )

    assert list((await features_stub.GetOnlineFeatures(request)).results[0].statuses) == [NOT_FOUND]
    client = redis.Redis.from_url(redis_server.url)
    key = f"{features_config.cache.cache_key_prefix}{view}:u".encode()
    for _ in range(50):  # the negative entry is written in the background
        if client.exists(key):
            break
        time.sleep(0.02)
    assert client.exists(key), "the miss was not cached"
    for n in (1, 2, 3):
        await features_stub.WriteFeatures(write(n))
        got = await features_stub.GetOnlineFeatures(request)
        assert got.results[0].values[0].int64_value == n
        assert list(got.results[0].statuses) == [OK]


async def test_evolving_adds_features_and_incompatible_changes_are_refused(features_stub: Stub) -> None:
    name = _name("evolve")
    view = typed_view(name)
    await features_stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=view))
    await features_stub.WriteFeatures(pb.WriteFeaturesRequest(feature_view=name, rows=[typed_row("a")]))
    view.features.add(name="added", type=VT.VALUE_TYPE_DOUBLE)
    reply = await features_stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=view))
    assert reply.feature_view.revision == 2 and not reply.created
    await features_stub.WriteFeatures(
        pb.WriteFeaturesRequest(
            feature_view=name,
            rows=[
                pb.FeatureRow(entity_key={"id": V(string_value="a")}, values={"added": V(double_value=0.25)})
            ],
        )
    )
    got = await features_stub.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(
            features=[f"{name}:added", f"{name}:f_string"], entities={"id": string_keys("a")}
        )
    )
    assert got.results[0].values[0].double_value == 0.25
    assert got.results[1].values[0].string_value == "héllo"
    stored = await features_stub.GetFeatureView(pb.GetFeatureViewRequest(name=name))
    assert [f.name for f in stored.features][-1] == "added" and stored.revision == 2

    retyped = pb.FeatureView()
    retyped.CopyFrom(view)
    retyped.features[2].type = VT.VALUE_TYPE_STRING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await features_stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=retyped))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'f_int64' is INT64 and cannot become STRING" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await features_stub.ApplyFeatureView(
            pb.ApplyFeatureViewRequest(feature_view=typed_view(name, key_type=VT.VALUE_TYPE_INT64))
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "entity key cannot change" in (info.value.details() or "")


CRAFTED = "x'); DROP TABLE feature_values; --"


@pytest.mark.parametrize(
    ("build", "code", "words"),
    [
        (
            lambda v: pb.GetOnlineFeaturesRequest(
                features=["no_such_view:x"], entities={"id": string_keys("a")}
            ),
            "NOT_FOUND",
            "'no_such_view'",
        ),
        (
            lambda v: pb.GetOnlineFeaturesRequest(
                features=[f"{v}:no_such"], entities={"id": string_keys("a")}
            ),
            "NOT_FOUND",
            "'no_such'",
        ),
        (
            lambda v: pb.GetOnlineFeaturesRequest(features=[f"{v}:f_float"], entities={"id": string_keys()}),
            "INVALID_ARGUMENT",
            "no rows",
        ),
        (
            lambda v: pb.GetOnlineFeaturesRequest(features=[f"{v}:f_float"], entities={}),
            "INVALID_ARGUMENT",
            "entities",
        ),
        (
            lambda v: pb.GetOnlineFeaturesRequest(
                features=[f"{v}:f_float"], entities={"id": string_keys(*map(str, range(1001)))}
            ),
            "INVALID_ARGUMENT",
            "1001 rows, at most 1000",
        ),
        (
            lambda v: pb.GetOnlineFeaturesRequest(
                features=[f"{v}:f_float"],
                entities={"id": string_keys("a").__class__(values=[V(int64_value=1)])},
            ),
            "INVALID_ARGUMENT",
            "expected STRING, got INT64",
        ),
        (
            lambda v: pb.GetOnlineFeaturesRequest(features=[CRAFTED], entities={"id": string_keys("a")}),
            "INVALID_ARGUMENT",
            "'view:feature'",
        ),
        (
            lambda v: pb.GetOnlineFeaturesRequest(
                features=[f"{CRAFTED}:f"], entities={"id": string_keys("a")}
            ),
            "NOT_FOUND",
            "DROP TABLE",
        ),
        (
            lambda v: pb.GetOnlineFeaturesRequest(
                features=[f"{v}:{CRAFTED}"], entities={"id": string_keys("a")}
            ),
            "NOT_FOUND",
            "DROP TABLE",
        ),
        (
            lambda v: pb.GetFeatureViewRequest(name=CRAFTED),
            "NOT_FOUND",
            "DROP TABLE",
        ),
        (
            lambda v: pb.ApplyFeatureViewRequest(feature_view=typed_view("bad").__class__(name=CRAFTED)),
            "INVALID_ARGUMENT",
            "feature_view.name",
        ),
        (
            lambda v: pb.WriteFeaturesRequest(
                feature_view=v,
                rows=[
                    pb.FeatureRow(entity_key={"id": V(string_value="a")}, values={CRAFTED: V(float_value=1)})
                ],
            ),
            "NOT_FOUND",
            "DROP TABLE",
        ),
    ],
)
async def test_bad_input_is_refused_naming_the_problem(
    features_stub: Stub,
    build,
    code: str,
    words: str,
) -> None:
    view = "badinput"
    await features_stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=typed_view(view)))
    request = build(view)
    method = {
        pb.GetOnlineFeaturesRequest: features_stub.GetOnlineFeatures,
        pb.GetFeatureViewRequest: features_stub.GetFeatureView,
        pb.ApplyFeatureViewRequest: features_stub.ApplyFeatureView,
        pb.WriteFeaturesRequest: features_stub.WriteFeatures,
    }[type(request)]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await method(request)
    assert info.value.code().name == code, info.value.details()
    assert words in (info.value.details() or "")


async def test_crafted_entity_keys_are_stored_and_read_as_data(
    features_stub: Stub, cassandra_server: Cassandra, features_config: FeaturesConfig
) -> None:
    view = _name("crafted")
    await features_stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=typed_view(view)))
    got = await features_stub.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(features=[f"{view}:f_float"], entities={"id": string_keys(CRAFTED)})
    )
    assert list(got.results[0].statuses) == [NOT_FOUND]
    await features_stub.WriteFeatures(pb.WriteFeaturesRequest(feature_view=view, rows=[typed_row(CRAFTED)]))
    got = await features_stub.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(features=[f"{view}:f_float"], entities={"id": string_keys(CRAFTED)})
    )
    assert list(got.results[0].statuses) == [OK]
    cluster = Cluster(
        cassandra_server.contact_points,
        port=cassandra_server.port,
        auth_provider=cassandra_server.auth_provider,
    )
    try:
        session = cluster.connect(features_config.cassandra.cassandra_keyspace)
        tables = {
            r.table_name
            for r in session.execute(
                "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s",
                (features_config.cassandra.cassandra_keyspace,),
            )
        }
        assert {"feature_values", "feature_views"} <= tables
    finally:
        cluster.shutdown()


async def test_reads_and_writes_work_with_the_cache_turned_off(features_config: FeaturesConfig) -> None:
    config = dataclasses.replace(
        features_config, cache=dataclasses.replace(features_config.cache, cache_enabled=False)
    )
    server = await create_server(config)
    await server.start()
    try:
        await wait_serving(server.port, SERVICE_NAME, timeout=60)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = features_pb2_grpc.FeatureServiceStub(channel)
            view = _name("nocache")
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=typed_view(view)))
            request = pb.GetOnlineFeaturesRequest(
                features=[f"{view}:f_bool"], entities={"id": string_keys("n")}
            )
            assert list((await stub.GetOnlineFeatures(request)).results[0].statuses) == [NOT_FOUND]
            await stub.WriteFeatures(pb.WriteFeaturesRequest(feature_view=view, rows=[typed_row("n")]))
            got = await stub.GetOnlineFeatures(request)
            assert list(got.results[0].statuses) == [OK] and got.results[0].values[0] == V(bool_value=False)
    finally:
        await server.stop(0, 1.0)
