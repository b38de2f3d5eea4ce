"""The stack's Redis: a real redis-py client round-trips as the administrator, and the ACL users hold.

Anonymous clients and wrong passwords are refused; each service's user runs its own client's commands on
its own key prefixes (the feature cache's RESP client, the rate limiter's scripts, the response cache) and
gets NOPERM on another service's keys.
"""

import stat
import uuid

import pytest
import redis
import redis.asyncio as redis_async

from libs.config import url_with_credentials
from libs.ratelimit import Bucket, LeasedLimiter, RedisTokenBucketLimiter
from services.features.redis_client import RedisReplyError, RespClient
from stack.redis import SERVICE_USERS, Redis, password_file

pytestmark = pytest.mark.integration


def _url(server: Redis, user: str) -> str:
    return url_with_credentials(
        server.address_url, user, password_file(server.config, user).read_text().strip()
    )


def test_set_then_get_round_trips(redis_server: Redis) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    key = f"stack-test:{uuid.uuid4().hex}"
    try:
        assert client.set(key, b"value", ex=60)
        assert client.get(key) == b"value"
    finally:
        client.delete(key)
        client.close()


def test_anonymous_clients_and_wrong_passwords_are_refused(redis_server: Redis) -> None:
    anonymous = redis.Redis.from_url(redis_server.address_url, socket_timeout=5)
    try:
        with pytest.raises(redis.AuthenticationError, match=r"NOAUTH|authenticated"):
            anonymous.get("ifs:anything")
    finally:
        anonymous.close()
    for user in ("default", *SERVICE_USERS):
        wrong = redis.Redis.from_url(url_with_credentials(redis_server.address_url, user, "not-it"))
        try:
            with pytest.raises(redis.AuthenticationError):
                wrong.ping()
        finally:
            wrong.close()


def test_passwords_and_the_acl_file_are_private_and_the_acl_holds_no_password(redis_server: Redis) -> None:
    assert stat.S_IMODE(redis_server.config.secrets_dir.stat().st_mode) == 0o700
    acl = redis_server.acl_file.read_text()
    assert stat.S_IMODE(redis_server.acl_file.stat().st_mode) == 0o600
    for user in ("default", "replica", *SERVICE_USERS):
        path = password_file(redis_server.config, user)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().strip() not in acl


async def test_the_feature_cache_user_reaches_its_keys_only(redis_server: Redis) -> None:
    client = RespClient(_url(redis_server, "features"), connect_timeout_s=5)
    key = f"ifs:test:{uuid.uuid4().hex}"
    try:
        assert await client.execute(("SET", key, b"v", "PX", 60_000)) == [b"OK"]
        assert await client.execute(("MGET", key)) == [[b"v"]]
        assert await client.execute(("DEL", key)) == [1]
        for other in ("igw:x", "infergrid:rl:edge:{t}"):
            with pytest.raises(RedisReplyError, match="NOPERM"):
                await client.execute(("MGET", other))
        with pytest.raises(RedisReplyError, match="NOPERM"):
            await client.execute(("FLUSHALL",))
    finally:
        await client.close()


async def test_the_rate_limit_users_run_the_scripts_on_the_buckets_only(redis_server: Redis) -> None:
    bucket = Bucket(f"infergrid:rl:test:{{{uuid.uuid4().hex}}}", 100.0, 10)
    for user in ("edge", "gateway"):
        client = redis_async.Redis.from_url(_url(redis_server, user), socket_timeout=5)
        try:
            assert (await RedisTokenBucketLimiter(client).hit([bucket])).allowed
            assert (await LeasedLimiter(client).hit([bucket])).allowed
            with pytest.raises(redis.exceptions.NoPermissionError):
                await RedisTokenBucketLimiter(client).hit([Bucket("ifs:not-a-bucket", 100.0, 10)])
            with pytest.raises(redis.exceptions.NoPermissionError):
                await client.get("ifs:someone-elses")
        finally:
            await client.aclose()


async def test_the_gateway_user_caches_responses_and_the_edge_user_cannot_read_them(
    redis_server: Redis,
) -> None:
    gateway = redis_async.Redis.from_url(_url(redis_server, "gateway"), socket_timeout=5)
    edge = redis_async.Redis.from_url(_url(redis_server, "edge"), socket_timeout=5)
    key = f"igw:test:{uuid.uuid4().hex}"
    try:
        assert await gateway.set(key, b"answer", px=60_000)
        assert await gateway.get(key) == b"answer"
        with pytest.raises(redis.exceptions.NoPermissionError):
            await edge.get(key)
        with pytest.raises(redis.exceptions.NoPermissionError):
            await gateway.keys("*")
    finally:
        await gateway.aclose()
        await edge.aclose()
