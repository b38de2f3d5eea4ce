"""The read-through cache in Redis: one key per entity per view holding its whole record.

A batch is read with one MGET (one round trip for every entity of every view in
a request) and filled with one pipelined round of SETs. Entities with no values
are cached too (a short "negative" entry), so repeated look-ups of unknown ids do
not reach Cassandra. Writes delete the keys they touch, so the next read sees
them. Redis being slow or down is a cache miss, never an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

from prometheus_client import Histogram

from libs.resilience import BreakerPolicy, Dependency, DependencyPolicy, RetryPolicy
from libs.telemetry import tracer
from services.features import codec
from services.features.codec import CorruptPayload, Record
from services.features.config import CacheConfig
from services.features.metrics import CACHE_LOOKUPS, REDIS_DEL, REDIS_MGET, REDIS_SET
from services.features.redis_client import RespClient

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

_HIT = CACHE_LOOKUPS.labels("hit")
_NEGATIVE = CACHE_LOOKUPS.labels("negative")
_MISS = CACHE_LOOKUPS.labels("miss")
_ERROR = CACHE_LOOKUPS.labels("error")


class _Absent:
    """The cache knows the entity has no values."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()
# Decoded records kept per process, keyed by their payload; all dropped when their payloads
# pass this size (each record takes about three times its payload in memory).
_DECODED_MAX_BYTES = 16 * 1024 * 1024
# A cache answer per key: a Record, ABSENT, or None (not cached).
CacheEntry = Record | _Absent | None


class FeatureCache(Protocol):
    """Entity records keyed by (view, entity key)."""

    enabled: bool

    async def get_many(self, keys: Sequence[bytes]) -> list[CacheEntry]:
        """One entry per key, in order."""
        ...

    async def put_many(self, items: Sequence[tuple[bytes, Record | None]], ttls_s: Sequence[float]) -> None:
        """Caches records (None: the entity has no values) with per-item TTLs."""
        ...

    async def invalidate(self, keys: Sequence[bytes]) -> None:
        """Forgets the keys, so the next read goes to the store."""
        ...


def cache_key(prefix: bytes, view: str, entity_key: bytes) -> bytes:
    """The Redis key of an entity of a view (view names cannot contain ':')."""
    return prefix + view.encode() + b":" + entity_key


@contextlib.contextmanager
def _span(name: str, keys: int, seconds: Histogram) -> Iterator[None]:
    """A Redis command's span and its duration in `seconds`."""
    with _tracer.start_as_current_span(name, attributes={"db.system": "redis", "infergrid.keys": keys}):
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds.observe(time.perf_counter() - started)


class NoCache:
    """The cache turned off: every look-up misses."""

    enabled = False

    async def get_many(self, keys: Sequence[bytes]) -> list[CacheEntry]:
        return [None] * len(keys)

    async def put_many(self, items: Sequence[tuple[bytes, Record | None]], ttls_s: Sequence[float]) -> None:
        return None

    async def invalidate(self, keys: Sequence[bytes]) -> None:
        return None


class RedisCache:
    """FeatureCache on Redis (a minimal pipelined client, see redis_client.py), behind a circuit breaker.

    Look-ups from concurrent requests are coalesced: keys asked for while
    `max_in_flight` MGETs are already on their way wait and leave together in the
    next one. At low load a request's MGET leaves at once; under load each
    round trip (and each Python-level Redis call) serves many requests.
    """

    enabled = True

    def __init__(self, config: CacheConfig, max_in_flight: int = 1) -> None:
        self._client = RespClient(config.redis_client_url(), connect_timeout_s=config.cache_timeout_s)
        self._redis = Dependency(
            "redis",
            DependencyPolicy(
                timeout_s=config.cache_timeout_s,
                retry=RetryPolicy(max_attempts=1),
                breaker=BreakerPolicy(failure_threshold=3, reset_timeout_s=2.0),
            ),
        )
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._flush_scheduled = False
        self._pending_keys: list[bytes] = []
        self._waiters: list[tuple[int, int, asyncio.Future[list[CacheEntry]]]] = []
        self._tasks: set[asyncio.Future[None]] = set()
        self._decoded: dict[bytes, Record] = {}
        self._decoded_bytes = 0

    async def close(self) -> None:
        await self._client.close()

    async def get_many(self, keys: Sequence[bytes]) -> list[CacheEntry]:
        """One entry per key; concurrent callers share MGETs (see the class docstring)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[CacheEntry]] = loop.create_future()
        start = len(self._pending_keys)
        self._pending_keys.extend(keys)
        self._waiters.append((start, len(self._pending_keys), future))
        if not self._flush_scheduled and self._in_flight < self._max_in_flight:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._waiters or self._in_flight >= self._max_in_flight:
            return
        keys, waiters = self._pending_keys, self._waiters
        self._pending_keys, self._waiters = [], []
        self._in_flight += 1
        task = asyncio.ensure_future(self._serve(keys, waiters))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self, keys: list[bytes], waiters: list[tuple[int, int, asyncio.Future[list[CacheEntry]]]]
    ) -> None:
        try:
            entries = await self._mget(keys)
        except BaseException:
            entries = [None] * len(keys)
            raise
        finally:
            self._in_flight -= 1
            if self._waiters and not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
            for start, end, future in waiters:
                if not future.done():
                    future.set_result(entries[start:end])

    async def _mget(self, keys: list[bytes]) -> list[CacheEntry]:
        with _span("redis MGET", len(keys), REDIS_MGET):
            try:
                (payloads,) = await self._redis.call(self._client.execute, ("MGET", *keys))
            except Exception as exc:
                _ERROR.inc(len(keys))
                log.debug("cache read failed: %s", exc)
                return [None] * len(keys)
        out: list[CacheEntry] = []
        hits = negatives = 0
        decoded = self._decoded
        for payload in payloads:
            if not isinstance(payload, bytes):
                out.append(None)
                continue
            # Decoding is a pure function of the payload: hot entities are decoded once.
            record = decoded.get(payload)
            if record is None:
                try:
                    record = codec.decode_record(payload)
                except CorruptPayload:
                    out.append(None)
                    continue
                if record is not None:
                    self._decoded_bytes += len(payload)
                    if self._decoded_bytes > _DECODED_MAX_BYTES:
                        decoded.clear()
                        self._decoded_bytes = len(payload)
                    decoded[payload] = record
            if record is None:
                negatives += 1
                out.append(ABSENT)
            else:
                hits += 1
                out.append(record)
        _HIT.inc(hits)
        _NEGATIVE.inc(negatives)
        _MISS.inc(len(keys) - hits - negatives)
        return out

    async def put_many(self, items: Sequence[tuple[bytes, Record | None]], ttls_s: Sequence[float]) -> None:
        if not items:
            return
        commands = [
            ("SET", key, codec.encode_record(record), "PX", max(1, int(ttl * 1000)))
            for (key, record), ttl in zip(items, ttls_s, strict=True)
        ]
        with _span("redis SET", len(items), REDIS_SET):
            try:
                await self._redis.call(self._client.execute, *commands)
            except Exception as exc:
                log.debug("cache fill failed: %s", exc)

    async def invalidate(self, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        with _span("redis DEL", len(keys), REDIS_DEL):
            try:
                await self._redis.call(self._client.execute, ("DEL", *keys))
            except Exception as exc:
                # The values stay cached until their TTL: say so loudly.
                log.warning("cache invalidation of %d keys failed: %s", len(keys), exc)
