"""RedisCache and its RESP client against a real Redis: round trips, TTLs, coalescing, errors, Redis down."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from libs.testing import free_port
from services.features import codec
from services.features.cache import ABSENT, RedisCache
from services.features.codec import Record
from services.features.config import CacheConfig
from services.features.redis_client import RedisReplyError, RespClient
from stack.redis import Redis

pytestmark = pytest.mark.integration


def _record(value: float) -> Record:
    raw = codec.Value(float_value=value).SerializeToString()
    return Record([1_700_000_000_000_000, codec.MISSING], [codec.value_frame(raw), codec.EMPTY_VALUE_FRAME])


async def test_put_get_invalidate_with_ttls(redis_server: Redis) -> None:
    cache = RedisCache(CacheConfig(redis_url=redis_server.url))
    try:
        keys = [b"t:cache:a", b"t:cache:b", b"t:cache:none"]
        await cache.invalidate(keys)
        assert await cache.get_many(keys) == [None, None, None]
        await cache.put_many(
            [(keys[0], _record(1.0)), (keys[1], _record(2.0)), (keys[2], None)], [60, 0.2, 60]
        )
        got = await cache.get_many(keys)
        assert got[0] == _record(1.0) and got[1] == _record(2.0) and got[2] is ABSENT
        ttl_ms = redis.Redis.from_url(redis_server.url).pttl(keys[0])
        assert 50_000 < ttl_ms <= 60_000
        await asyncio.sleep(0.3)
        assert (await cache.get_many(keys))[1] is None  # its 0.2 s TTL passed
        await cache.invalidate(keys[:1])
        assert (await cache.get_many(keys))[0] is None
    finally:
        await cache.close()


async def test_concurrent_lookups_share_round_trips(redis_server: Redis) -> None:
    cache = RedisCache(CacheConfig(redis_url=redis_server.url))
    calls = 0
    execute = cache._client.execute

    async def counting(*commands: object) -> list[object]:
        nonlocal calls
        calls += 1
        return await execute(*commands)  # type: ignore[arg-type]

    cache._client.execute = counting  # type: ignore[method-assign]
    try:
        await cache.put_many([(f"t:co:{i}".encode(), _record(float(i))) for i in range(100)], [60] * 100)
        calls = 0
        results = await asyncio.gather(
            *(cache.get_many([f"t:co:{i}".encode(), b"t:co:missing"]) for i in range(100))
        )
        assert [r[0] for r in results] == [_record(float(i)) for i in range(100)]
        assert all(r[1] is None for r in results)
        assert calls <= 3, calls
    finally:
        await cache.close()


async def test_resp_client_database_errors_and_reconnect(redis_server: Redis) -> None:
    client = RespClient(redis_server.url.removesuffix("/0") + "/3")
    try:
        assert await client.execute(("SET", "t:resp", "x"), ("GET", "t:resp")) == [b"OK", b"x"]
        assert redis.Redis.from_url(redis_server.url.removesuffix("/0") + "/3").get("t:resp") == b"x"
        with pytest.raises(RedisReplyError):
            await client.execute(("INCR", "t:resp"))
        await client.close()
        assert await client.execute(("GET", "t:resp")) == [b"x"]  # reconnects
    finally:
        await client.close()


async def test_redis_down_is_a_fast_miss() -> None:
    cache = RedisCache(CacheConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0", cache_timeout_s=0.1))
    try:
        for _ in range(5):
            started = time.perf_counter()
            assert await cache.get_many([b"a", b"b"]) == [None, None]
            assert time.perf_counter() - started < 0.5
        await cache.put_many([(b"a", None)], [1])
        await cache.invalidate([b"a"])
    finally:
        await cache.close()


async def test_redis_latency_histograms(redis_server: Redis) -> None:
    from prometheus_client import REGISTRY

    def count(operation: str) -> float:
        labels = {"db_system_name": "redis", "db_operation_name": operation}
        return REGISTRY.get_sample_value("db_client_operation_duration_seconds_count", labels) or 0.0

    before = {op: count(op) for op in ("MGET", "SET", "DEL")}
    cache = RedisCache(CacheConfig(redis_url=redis_server.url))
    try:
        await cache.put_many([(b"t:latency:a", _record(1.0))], [60])
        await cache.get_many([b"t:latency:a"])
        await cache.invalidate([b"t:latency:a"])
    finally:
        await cache.close()
    assert {op: count(op) - before[op] for op in before} == {"MGET": 1, "SET": 1, "DEL": 1}
