"""pytest configuration for tests/: the stack's server fixtures (see tests/stack_fixtures.py)."""

from tests.stack_fixtures import (
    cassandra_server,
    envoy_binary,
    envoy_factory,
    jaeger_server,
    kafka_server,
    redis_server,
    stack,
    stack_config,
)

__all__ = [
    "cassandra_server",
    "envoy_binary",
    "envoy_factory",
    "jaeger_server",
    "kafka_server",
    "redis_server",
    "stack",
    "stack_config",
]
