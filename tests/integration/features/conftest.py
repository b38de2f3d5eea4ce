"""Fixtures of the features integration tests: a FeaturesConfig on the session's Cassandra and Redis."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from cassandra.cluster import Cluster

from infergrid.features.v1 import features_pb2_grpc
from libs.testing import wait_serving
from services.features.config import FeaturesConfig, LimitsConfig
from services.features.server import SERVICE_NAME, create_server
from stack.cassandra import Cassandra
from stack.redis import Redis
from tests.integration.features.features_harness import features_config as features_config_for


@pytest.fixture(scope="session")
def features_config(cassandra_server: Cassandra, redis_server: Redis) -> Iterator[FeaturesConfig]:
    """The service config for this session: its own keyspaces and cache prefix (dropped at the end)."""
    yield features_config_for(
        cassandra_server,
        redis_server,
        f"features_it_{os.getpid()}",
        f"it{os.getpid()}:",
        2.0,
        limits=LimitsConfig(max_entities_per_request=1000),
    )
    # When the session borrows a developer's stack (INFERGRID_REUSE_STACK=1), leave nothing behind.
    cluster = Cluster(
        cassandra_server.contact_points,
        port=cassandra_server.port,
        auth_provider=cassandra_server.auth_provider,
    )
    try:
        session = cluster.connect()
        for keyspace in (f"features_it_{os.getpid()}", f"features_demo_{os.getpid()}"):
            session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
    except Exception as exc:  # cleanup only: never fail the session for it
        print(f"features tests: could not drop their keyspaces: {exc}")
    finally:
        cluster.shutdown()


@pytest.fixture(scope="session")
async def features_stub(
    features_config: FeaturesConfig,
) -> AsyncIterator[features_pb2_grpc.FeatureServiceStub]:
    """A features server on the real Cassandra and Redis, SERVING, and a stub to it."""
    server = await create_server(features_config)
    await server.start()
    try:
        await wait_serving(server.port, SERVICE_NAME, timeout=60)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield features_pb2_grpc.FeatureServiceStub(channel)
    finally:
        await server.stop(0, 1.0)
