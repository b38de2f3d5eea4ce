"""Token-bucket rate limiting in Redis, shared by every replica of whoever admits requests.

Two ways to charge the same buckets (same keys, same fields, so either may serve a tier):
- `RedisTokenBucketLimiter`: one atomic Lua script checks and charges every bucket of a request (the
  edge's rate-limit service, one EVALSHA per request);
- `LeasedLimiter`: a process leases a slice of a bucket's tokens (about `lease_s` worth of its rate)
  in one EVALSHA and spends them locally, so the request path costs a dict lookup, not a round trip
  (the gateway, when it admits requests itself). The global rate holds exactly (leased tokens are
  taken from Redis); what a lease costs is fairness: tokens one replica holds are not available to
  another until they are spent or expire (`lease_ttl_s`), and a tier's low-rate buckets (less than one
  token per lease) still take one round trip per request.

A bucket holds up to `burst` tokens and refills at `requests_per_second`; a request takes `cost`
tokens from each of its buckets (the tenant's, and the (tenant, model) one when the model has its own
tier) or, if any bucket is short, from none. Unlike a fixed window there is no boundary at which twice
the rate gets through, and a rejected request costs nothing, so a client that backs off for the
advised time gets in. Time comes from Redis (`TIME`), so every edge replica agrees on it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as redis_async

from libs.platform import PlatformConfig

# Shared by both scripts: the time from Redis (`TIME`, so every replica agrees), a bucket's level now
# (refilled since it was last written; a bucket never seen is full) and its write-back (it expires
# once it would be full again anyway).
_LUA_PRELUDE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local function level(key, rate, burst)
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(state[1])
  local ts = tonumber(state[2])
  if tokens == nil or ts == nil then return burst end
  local elapsed = now - ts
  if elapsed < 0 then elapsed = 0 end
  return math.min(burst, tokens + elapsed * rate / 1000000)
end
local function store(key, rate, burst, tokens)
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
end
"""

# KEYS: the buckets. ARGV: per bucket rate (tokens/s), burst, cost.
# Returns: allowed (1/0), then per bucket: tokens left (floor), microseconds until `cost` tokens are there.
TOKEN_BUCKET_LUA = (
    _LUA_PRELUDE
    + """
local allowed = 1
local levels = {}
for i = 1, #KEYS do
  local base = (i - 1) * 3
  levels[i] = level(KEYS[i], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]))
  if levels[i] < tonumber(ARGV[base + 3]) then allowed = 0 end
end
local out = {allowed}
for i = 1, #KEYS do
  local base = (i - 1) * 3
  local rate = tonumber(ARGV[base + 1])
  local cost = tonumber(ARGV[base + 3])
  local tokens = levels[i]
  if allowed == 1 then tokens = tokens - cost end
  store(KEYS[i], rate, tonumber(ARGV[base + 2]), tokens)
  local wait = 0
  if tokens < cost then wait = math.ceil((cost - tokens) * 1000000 / rate) end
  out[#out + 1] = math.floor(tokens)
  out[#out + 1] = wait
end
return out
"""
)

# KEYS[1]: the bucket. ARGV: rate (tokens/s), burst, the most tokens wanted.
# Takes what is there, up to the wish: returns granted (whole tokens), microseconds until one token is there.
LEASE_LUA = (
    _LUA_PRELUDE
    + """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tokens = level(KEYS[1], rate, burst)
local grant = math.floor(math.min(tonumber(ARGV[3]), tokens))
if grant < 0 then grant = 0 end
tokens = tokens - grant
store(KEYS[1], rate, burst, tokens)
local wait = 0
if tokens < 1 then wait = math.ceil((1 - tokens) * 1000000 / rate) end
return {grant, wait}
"""
)


@dataclass(frozen=True)
class Bucket:
    """One bucket to charge: its key and its tier's parameters."""

    key: str
    requests_per_second: float
    burst: int
    cost: int = 1


@dataclass(frozen=True)
class BucketState:
    """A bucket after the check: whole tokens left and the wait until the request would fit."""

    remaining: int
    wait_seconds: float


@dataclass(frozen=True)
class LimitResult:
    """The outcome for all buckets of one request (same order as asked)."""

    allowed: bool
    buckets: tuple[BucketState, ...]

    @property
    def retry_after_seconds(self) -> float:
        """How long to back off before the request would be allowed."""
        return max((b.wait_seconds for b in self.buckets), default=0.0)


class RateLimiter(Protocol):
    """Checks and charges a request's buckets atomically."""

    async def hit(self, buckets: Sequence[Bucket]) -> LimitResult:
        """Charges every bucket or none; raises on a store failure (the caller decides fail-open)."""
        ...


class RedisTokenBucketLimiter:
    """The token buckets in Redis, one EVALSHA per request."""

    def __init__(self, client: redis_async.Redis) -> None:
        self._script = client.register_script(TOKEN_BUCKET_LUA)

    async def hit(self, buckets: Sequence[Bucket]) -> LimitResult:
        """Runs the script (EVALSHA; loaded on first use)."""
        if not buckets:
            return LimitResult(True, ())
        args = [x for b in buckets for x in (b.requests_per_second, b.burst, b.cost)]
        reply = await self._script(keys=[b.key for b in buckets], args=args)
        states = tuple(
            BucketState(remaining=int(reply[1 + 2 * i]), wait_seconds=int(reply[2 + 2 * i]) / 1_000_000)
            for i in range(len(buckets))
        )
        return LimitResult(allowed=bool(int(reply[0])), buckets=states)


def plan_bucket(
    platform: PlatformConfig, prefix: str, domain: str, tenant_name: str, model: str | None, *, cost: int = 1
) -> Bucket | None:
    """The bucket for a tenant (`model` None) or for a tenant's calls to one model; None: no limit applies.

    The hash tag keeps a tenant's buckets in one Redis Cluster slot (one script, many keys).
    """
    tenant = platform.tenants.get(tenant_name)
    if tenant is None:
        return None
    base = f"{prefix}:{domain}:{{{tenant_name}}}"
    if model is None:
        tier = platform.rate_limit_tiers[tenant.tier]
        return Bucket(base, tier.requests_per_second, tier.burst, cost)
    route = platform.models.get(model)
    if route is None or not route.rate_limit_tier:
        return None
    tier = platform.rate_limit_tiers[route.rate_limit_tier]
    return Bucket(f"{base}:model:{model}", tier.requests_per_second, tier.burst, cost)


@dataclass(slots=True)
class _Lease:
    """A process's share of one bucket: tokens in hand, when they were leased, the refill under way."""

    tokens: float = 0.0
    # Tokens callers are waiting for: the next lease asks for at least this many (a burst of
    # concurrent requests on a slow tier is served by one round trip, not one each).
    demand: int = 0
    leased_at: float = 0.0
    refill: asyncio.Future[None] | None = None
    # Redis said the bucket is empty: no new lease is asked for before this (monotonic) time.
    empty_until: float = 0.0


class LeasedLimiter:
    """Charges buckets from locally held leases, refilled from Redis ahead of need (see the module doc).

    `hit` raises on a store failure like `RedisTokenBucketLimiter.hit`; the caller decides fail-open.
    Multi-bucket requests are all-or-nothing: tokens are spent only when every bucket has them.
    """

    def __init__(
        self,
        client: redis_async.Redis,
        *,
        lease_s: float = 0.05,
        lease_ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._script = client.register_script(LEASE_LUA)
        self._lease_s = lease_s
        self._ttl = lease_ttl_s
        self._clock = clock
        self._leases: dict[str, _Lease] = {}

    def _chunk(self, bucket: Bucket) -> int:
        return max(bucket.cost, min(bucket.burst, math.ceil(bucket.requests_per_second * self._lease_s)))

    def _lease(self, bucket: Bucket) -> _Lease:
        lease = self._leases.get(bucket.key)
        if lease is None:
            lease = self._leases[bucket.key] = _Lease()
        elif lease.tokens and self._clock() - lease.leased_at > self._ttl:
            lease.tokens = 0.0  # stale: a burst long ago must not add to today's
        return lease

    async def _refill(self, bucket: Bucket, lease: _Lease) -> None:
        if lease.refill is None:
            lease.refill = asyncio.ensure_future(self._fetch(bucket, lease))
        await asyncio.shield(lease.refill)

    async def _fetch(self, bucket: Bucket, lease: _Lease) -> None:
        want = min(bucket.burst, max(self._chunk(bucket), lease.demand))
        lease.demand = 0
        try:
            granted, wait_us = await self._script(
                keys=[bucket.key], args=[bucket.requests_per_second, bucket.burst, want]
            )
            now = self._clock()
            if now - lease.leased_at > self._ttl:
                lease.tokens = 0.0
            lease.tokens += int(granted)
            lease.leased_at = now
            lease.empty_until = now + int(wait_us) / 1_000_000 if int(granted) == 0 else 0.0
        finally:
            lease.refill = None

    async def hit(self, buckets: Sequence[Bucket]) -> LimitResult:
        """Spends `cost` from every bucket's lease, leasing more from Redis where one runs short."""
        if not buckets:
            return LimitResult(True, ())
        leases = [self._lease(b) for b in buckets]
        pairs = list(zip(buckets, leases, strict=True))
        for _ in range(3):  # concurrent callers may spend a fresh lease before this one resumes
            now = self._clock()
            short = [(b, lease) for b, lease in pairs if lease.tokens < b.cost and now >= lease.empty_until]
            if not short:
                break
            for bucket, lease in short:
                lease.demand += bucket.cost
            for bucket, lease in short:
                await self._refill(bucket, lease)
        now = self._clock()
        waits = [
            0.0 if lease.tokens >= b.cost else max(lease.empty_until - now, 1 / b.requests_per_second)
            for b, lease in pairs
        ]
        allowed = not any(waits)
        if allowed:
            for bucket, lease in pairs:
                lease.tokens -= bucket.cost
                # Prefetch the next lease before this one runs dry, off the request's path.
                if lease.tokens < self._chunk(bucket) / 2 and lease.refill is None:
                    lease.refill = asyncio.ensure_future(self._fetch(bucket, lease))
                    lease.refill.add_done_callback(_consume_exception)
        return LimitResult(
            allowed,
            tuple(
                BucketState(remaining=int(lease.tokens), wait_seconds=wait)
                for lease, wait in zip(leases, waits, strict=True)
            ),
        )


def _consume_exception(future: asyncio.Future[None]) -> None:
    # A failed prefetch is retried by the next request that runs short; nothing waits on this one.
    if not future.cancelled():
        future.exception()


def retry_after_header(seconds: float) -> str:
    """The Retry-After value: whole seconds, at least 1 (HTTP allows no fractions)."""
    return str(max(1, math.ceil(seconds)))
