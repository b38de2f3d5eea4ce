"""The stack's Redis answers a real redis-py client."""

import uuid

import pytest
import redis

from stack.redis import Redis

pytestmark = pytest.mark.integration


def test_set_then_get_round_trips(redis_server: Redis) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    key = f"stack-test:{uuid.uuid4().hex}"
    try:
        assert client.set(key, b"value", ex=60)
        assert client.get(key) == b"value"
    finally:
        client.delete(key)
        client.close()
