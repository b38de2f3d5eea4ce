"""The token-bucket script against a real Redis: burst, refill, all-or-nothing, retry hints."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as redis_async

from services.edge.limiter import Bucket, RedisTokenBucketLimiter, retry_after_header
from stack.redis import Redis

pytestmark = pytest.mark.integration


def _key() -> str:
    return f"infergrid-test:rl:{uuid.uuid4().hex}"


async def _limiter(redis_server: Redis) -> tuple[RedisTokenBucketLimiter, redis_async.Redis]:
    client = redis_async.Redis.from_url(redis_server.url)
    return RedisTokenBucketLimiter(client), client


async def test_burst_then_refill(redis_server: Redis) -> None:
    limiter, client = await _limiter(redis_server)
    bucket = Bucket(_key(), requests_per_second=10, burst=5)
    try:
        results = [await limiter.hit([bucket]) for _ in range(7)]
        assert [r.allowed for r in results] == [True] * 5 + [False] * 2
        assert results[4].buckets[0].remaining == 0
        # One token comes back every 100 ms; the refused request says so.
        assert 0 < results[5].retry_after_seconds <= 0.1
        await asyncio.sleep(0.25)
        after = await limiter.hit([bucket])
        assert after.allowed
        assert await client.pttl(bucket.key) > 0  # idle buckets expire
    finally:
        await client.aclose()


async def test_all_or_nothing_over_several_buckets(redis_server: Redis) -> None:
    limiter, client = await _limiter(redis_server)
    wide = Bucket(_key(), requests_per_second=1, burst=10)
    narrow = Bucket(_key(), requests_per_second=1, burst=1)
    try:
        first = await limiter.hit([wide, narrow])
        second = await limiter.hit([wide, narrow])
        assert (first.allowed, second.allowed) == (True, False)
        # The refused request took nothing from the wide bucket: 9 left, not 8.
        assert second.buckets[0].remaining == 9
        assert second.buckets[1].wait_seconds > 0.5
        assert retry_after_header(second.retry_after_seconds) == "1"
    finally:
        await client.aclose()


async def test_concurrent_hits_never_overspend(redis_server: Redis) -> None:
    limiter, client = await _limiter(redis_server)
    bucket = Bucket(_key(), requests_per_second=0.001, burst=20)
    try:
        results = await asyncio.gather(*(limiter.hit([bucket]) for _ in range(60)))
        assert sum(r.allowed for r in results) == 20
    finally:
        await client.aclose()
