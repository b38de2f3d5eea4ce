"""A features service config on the test session's Cassandra (as its administrator: the tests' keyspaces are
their own, the stack's roles may create none) and Redis; for the features tests and the others that run one."""

from __future__ import annotations

from typing import Any

from services.features.config import CacheConfig, FeaturesConfig, FeaturesServerConfig
from stack.cassandra import Cassandra
from stack.redis import Redis


def features_config(
    cassandra: Cassandra, redis: Redis, keyspace: str, cache_prefix: str, timeout_s: float, **sections: Any
) -> FeaturesConfig:
    """A FeaturesConfig on a free port, keyspace `keyspace`, cache keys under `cache_prefix`."""
    return FeaturesConfig(
        server=FeaturesServerConfig(port=0, readiness_interval_seconds=0.5),
        cassandra=cassandra.admin_config(keyspace, cassandra_request_timeout_s=timeout_s),
        cache=CacheConfig(redis_url=redis.url, cache_key_prefix=cache_prefix),
        **sections,
    )
