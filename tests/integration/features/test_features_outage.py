"""Cassandra stopped and started again under a running features server: degrade, fail fast, recover."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
import redis

from infergrid.features.v1 import features_pb2 as pb
from infergrid.features.v1 import features_pb2_grpc
from services.features.config import FeaturesConfig
from services.features.tests.views import string_keys, typed_row, typed_view
from stack.cassandra import Cassandra
from stack.redis import Redis

pytestmark = pytest.mark.integration


async def test_cassandra_outage_serves_cached_values_as_stale_fails_fast_and_recovers(
    features_stub: features_pb2_grpc.FeatureServiceStub,
    features_config: FeaturesConfig,
    cassandra_server: Cassandra,
    redis_server: Redis,
) -> None:
    view = f"outage_{uuid.uuid4().hex[:8]}"
    await features_stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=typed_view(view)))
    await features_stub.WriteFeatures(pb.WriteFeaturesRequest(feature_view=view, rows=[typed_row("hot")]))
    hot = pb.GetOnlineFeaturesRequest(features=[f"{view}:f_float"], entities={"id": string_keys("hot")})
    cold = pb.GetOnlineFeaturesRequest(features=[f"{view}:f_float"], entities={"id": string_keys("cold")})
    assert not (await features_stub.GetOnlineFeatures(hot)).possibly_stale
    cached = redis.Redis.from_url(redis_server.url)
    key = f"{features_config.cache.cache_key_prefix}{view}:hot"
    for _ in range(100):
        if cached.exists(key):
            break
        await asyncio.sleep(0.02)

    await asyncio.to_thread(cassandra_server.stop)
    try:
        # Values still in Redis are served, marked possibly stale (once the probe has seen the outage).
        deadline = time.monotonic() + 15
        while True:
            served = await features_stub.GetOnlineFeatures(hot)
            assert list(served.results[0].statuses) == [pb.FEATURE_STATUS_PRESENT]
            if served.possibly_stale:
                break
            assert time.monotonic() < deadline, "cached reads were never marked possibly stale"
            await asyncio.sleep(0.2)
        # Anything else fails with UNAVAILABLE, and fast once the breaker is open.
        durations = []
        for _ in range(10):
            started = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await features_stub.GetOnlineFeatures(cold, timeout=10)
            durations.append(time.perf_counter() - started)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert max(durations[-5:]) < 0.25, durations
    finally:
        await asyncio.to_thread(cassandra_server.start)

    # Recovers by itself: no restart of the service.
    deadline = time.monotonic() + 60
    while True:
        try:
            got = await features_stub.GetOnlineFeatures(cold, timeout=5)
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
            assert time.monotonic() < deadline, "the service did not recover after Cassandra came back"
            await asyncio.sleep(0.5)
    assert list(got.results[0].statuses) == [pb.FEATURE_STATUS_NOT_FOUND]
    deadline = time.monotonic() + 10
    while (await features_stub.GetOnlineFeatures(hot)).possibly_stale:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    await features_stub.WriteFeatures(pb.WriteFeaturesRequest(feature_view=view, rows=[typed_row("cold")]))
    got = await features_stub.GetOnlineFeatures(cold)
    assert list(got.results[0].statuses) == [pb.FEATURE_STATUS_PRESENT]
