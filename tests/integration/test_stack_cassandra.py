"""The stack's Cassandra answers a real cassandra-driver client: keyspace, table, write, read."""

import uuid
from collections.abc import Iterator

import pytest
from cassandra.cluster import Cluster, Session

from stack.cassandra import Cassandra

pytestmark = pytest.mark.integration


@pytest.fixture
def session(cassandra_server: Cassandra) -> Iterator[Session]:
    cluster = Cluster(cassandra_server.contact_points, port=cassandra_server.port, connect_timeout=10)
    try:
        yield cluster.connect()
    finally:
        cluster.shutdown()


def test_create_keyspace_and_table_write_and_read_back(session: Session) -> None:
    keyspace = f"stack_test_{uuid.uuid4().hex[:8]}"
    session.execute(
        f"CREATE KEYSPACE {keyspace} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
    )
    try:
        session.execute(f"CREATE TABLE {keyspace}.features (entity text PRIMARY KEY, score double)")
        insert = session.prepare(f"INSERT INTO {keyspace}.features (entity, score) VALUES (?, ?)")
        session.execute(insert, ("user-1", 0.25))

        row = session.execute(f"SELECT score FROM {keyspace}.features WHERE entity = %s", ("user-1",)).one()

        assert row is not None
        assert row.score == 0.25
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")


def test_release_version_is_five(session: Session) -> None:
    row = session.execute("SELECT release_version FROM system.local").one()
    assert row.release_version.startswith("5.0")
