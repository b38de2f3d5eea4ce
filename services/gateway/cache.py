"""The optional response cache: a prediction keyed by model, version and the request's inputs (Redis)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from infergrid.types.v1 import value_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedAnswer:
    """What a cached prediction keeps: its outputs and the features that were defaulted."""

    outputs: dict[str, np.ndarray]
    degraded_features: tuple[str, ...]

    def encode(self) -> bytes:
        return json.dumps(
            {"o": {k: v.tolist() for k, v in self.outputs.items()}, "d": list(self.degraded_features)}
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> CachedAnswer:
        raw = json.loads(data)
        outputs = {k: np.asarray(v, dtype=np.float32) for k, v in raw["o"].items()}
        return cls(outputs, tuple(raw["d"]))


def cache_key(
    prefix: str,
    model: str,
    version: str,
    entities: Mapping[str, str],
    features: Mapping[str, value_pb2.Value],
) -> bytes:
    """A key that changes with the model, the version and any input (entities and request features)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{model}\0{version}\0".encode())
    for name in sorted(entities):
        digest.update(f"{name}={entities[name]}\0".encode())
    for name in sorted(features):
        digest.update(name.encode() + b"=" + features[name].SerializeToString(deterministic=True) + b"\0")
    return f"{prefix}{model}:{version}:".encode() + digest.hexdigest().encode()


class ResponseCache(Protocol):
    """Keeps answers for a short time; a failing cache is a miss, never an error."""

    async def get(self, key: bytes) -> CachedAnswer | None: ...

    async def put(self, key: bytes, answer: CachedAnswer) -> None: ...

    async def close(self) -> None: ...


class RedisResponseCache:
    """The response cache on Redis (GET / SET with a TTL), each command bounded by a short timeout."""

    def __init__(self, url: str, ttl_s: float, timeout_s: float) -> None:
        import redis.asyncio as redis

        self._redis: Any = redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._timeout = timeout_s

    async def get(self, key: bytes) -> CachedAnswer | None:
        try:
            async with asyncio.timeout(self._timeout):
                data = await self._redis.get(key)
        except Exception as exc:  # the cache is an optimisation: any failure is a miss
            log.debug("response cache get failed: %s", exc)
            return None
        if data is None:
            return None
        try:
            return CachedAnswer.decode(data)
        except (ValueError, KeyError, TypeError):
            return None

    async def put(self, key: bytes, answer: CachedAnswer) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._redis.set(key, answer.encode(), px=self._ttl_ms)
        except Exception as exc:
            log.debug("response cache put failed: %s", exc)

    async def close(self) -> None:
        await self._redis.aclose()
