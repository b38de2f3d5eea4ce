"""The token buckets against a real Redis: the per-request script (burst, refill, all-or-nothing, retry hints)
and the leased limiter (global exactness across processes' leases, prefetch, empty buckets, lapsed leases)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as redis_async

from libs.ratelimit import Bucket, LeasedLimiter, RedisTokenBucketLimiter, retry_after_header
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


async def test_leases_from_several_replicas_never_overspend_the_global_bucket(redis_server: Redis) -> None:
    client = redis_async.Redis.from_url(redis_server.url)
    # Three gateway replicas share one bucket: 50 tokens, (almost) no refill.
    replicas = [LeasedLimiter(client, lease_s=0.05) for _ in range(3)]
    slow = Bucket(_key(), requests_per_second=0.001, burst=50)
    try:
        results = await asyncio.gather(*(replicas[i % 3].hit([slow]) for i in range(120)))
        admitted = sum(r.allowed for r in results)
        # Every admitted request spent a token leased from Redis: never more than the bucket held, and
        # at most one lease per replica (1 token at this rate) is left unspent.
        assert 47 <= admitted <= 50
        refused = next(r for r in results if not r.allowed)
        assert refused.retry_after_seconds > 0
        # A lease is about lease_s of the rate (200/s * 0.05 s = 10 tokens), not the whole burst.
        fresh = LeasedLimiter(client, lease_s=0.05)
        other = Bucket(_key(), requests_per_second=200, burst=50)
        assert (await fresh.hit([other])).allowed
        state = await client.hmget(other.key, "tokens")
        assert 39 <= float(state[0]) <= 41
    finally:
        await client.aclose()


async def test_a_lease_prefetches_so_steady_traffic_rarely_waits_for_redis(redis_server: Redis) -> None:
    client = redis_async.Redis.from_url(redis_server.url)
    limiter = LeasedLimiter(client, lease_s=0.05)
    bucket = Bucket(_key(), requests_per_second=2000, burst=4000)  # leases of 100 tokens
    calls = 0
    script = limiter._script

    async def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return await script(*args, **kwargs)

    limiter._script = counting  # type: ignore[assignment]
    try:
        for _ in range(1000):
            assert (await limiter.hit([bucket])).allowed
        await asyncio.sleep(0.05)  # the last prefetch lands
        # 1000 requests from leases of 100: about 10-11 round trips, not 1000.
        assert calls <= 15
    finally:
        await client.aclose()


async def test_an_empty_bucket_refuses_until_it_refills_and_leases_lapse(redis_server: Redis) -> None:
    client = redis_async.Redis.from_url(redis_server.url)
    now = [1000.0]
    limiter = LeasedLimiter(client, lease_s=0.05, lease_ttl_s=1.0, clock=lambda: now[0])
    bucket = Bucket(_key(), requests_per_second=10, burst=3)  # a lease is 1 token
    try:
        outcomes = [(await limiter.hit([bucket])).allowed for _ in range(6)]
        assert outcomes[:3] == [True, True, True]
        assert not any(outcomes[4:])
        refused = await limiter.hit([bucket])
        assert not refused.allowed and 0 < refused.retry_after_seconds <= 0.1
        # The limiter does not ask Redis again before the advised wait; after it, Redis has refilled.
        await asyncio.sleep(0.25)
        now[0] += 0.25
        assert (await limiter.hit([bucket])).allowed
        # A lease held past its TTL lapses: those tokens are not spent later.
        held = Bucket(_key(), requests_per_second=1000, burst=1000)
        assert (await limiter.hit([held])).allowed
        lease = limiter._leases[held.key]
        assert lease.tokens > 0
        now[0] += 5
        limiter._lease(held)
        assert lease.tokens == 0
    finally:
        await client.aclose()
