"""Token-bucket rate limiting in Redis: one atomic Lua script checks and charges every bucket of a request.

A bucket holds up to `burst` tokens and refills at `requests_per_second`; a request takes `cost`
tokens from each of its buckets (the tenant's, and the (tenant, model) one when the model has its own
tier) or, if any bucket is short, from none. Unlike a fixed window there is no boundary at which twice
the rate gets through, and a rejected request costs nothing, so a client that backs off for the
advised time gets in. Time comes from Redis (`TIME`), so every edge replica agrees on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as redis_async

# KEYS: the buckets. ARGV: per bucket rate (tokens/s), burst, cost.
# Returns: allowed (1/0), then per bucket: tokens left (floor), microseconds until `cost` tokens are there.
TOKEN_BUCKET_LUA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local allowed = 1
local levels = {}
for i = 1, #KEYS do
  local rate = tonumber(ARGV[(i - 1) * 3 + 1])
  local burst = tonumber(ARGV[(i - 1) * 3 + 2])
  local cost = tonumber(ARGV[(i - 1) * 3 + 3])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens = tonumber(state[1])
  local ts = tonumber(state[2])
  if tokens == nil or ts == nil then
    tokens = burst
    ts = now
  end
  local elapsed = now - ts
  if elapsed < 0 then elapsed = 0 end
  tokens = math.min(burst, tokens + elapsed * rate / 1000000)
  levels[i] = tokens
  if tokens < cost then allowed = 0 end
end
local out = {allowed}
for i = 1, #KEYS do
  local rate = tonumber(ARGV[(i - 1) * 3 + 1])
  local burst = tonumber(ARGV[(i - 1) * 3 + 2])
  local cost = tonumber(ARGV[(i - 1) * 3 + 3])
  local tokens = levels[i]
  if allowed == 1 then tokens = tokens - cost end
  redis.call('HSET', KEYS[i], 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil(burst / rate * 1000) + 1000)
  local wait = 0
  if tokens < cost then wait = math.ceil((cost - tokens) * 1000000 / rate) end
  out[#out + 1] = math.floor(tokens)
  out[#out + 1] = wait
end
return out
"""


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
        self._client = client
        self._script = client.register_script(TOKEN_BUCKET_LUA)

    async def hit(self, buckets: Sequence[Bucket]) -> LimitResult:
        """Runs the script (EVALSHA; loaded on first use)."""
        if not buckets:
            return LimitResult(True, ())
        args: list[float | int] = []
        for b in buckets:
            args.extend((b.requests_per_second, b.burst, b.cost))
        reply = await self._script(keys=[b.key for b in buckets], args=args)
        states = tuple(
            BucketState(remaining=int(reply[1 + 2 * i]), wait_seconds=int(reply[2 + 2 * i]) / 1_000_000)
            for i in range(len(buckets))
        )
        return LimitResult(allowed=bool(int(reply[0])), buckets=states)


def retry_after_header(seconds: float) -> str:
    """The Retry-After value: whole seconds, at least 1 (HTTP allows no fractions)."""
    return str(max(1, math.ceil(seconds)))
