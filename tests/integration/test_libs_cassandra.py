"""libs.cassandra against a real Cassandra: keyspace creation, prepared statements from asyncio, paging."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from libs.cassandra import AsyncCassandra, CassandraConfig, connect
from stack.cassandra import Cassandra

pytestmark = pytest.mark.integration


def _config(cassandra_server: Cassandra, keyspace: str) -> CassandraConfig:
    return cassandra_server.admin_config(
        keyspace,
        cassandra_write_consistency="ONE",
        # Generous: this checks behaviour, not speed, on a busy 2-core machine.
        cassandra_request_timeout_s=15.0,
    )


async def test_prepared_writes_and_reads_from_asyncio(cassandra_server) -> None:  # type: ignore[no-untyped-def]
    keyspace = f"libs_{uuid.uuid4().hex[:8]}"
    session = connect(_config(cassandra_server, keyspace))
    try:
        session.execute("CREATE TABLE IF NOT EXISTS kv (k text PRIMARY KEY, v int)")
        db = AsyncCassandra(session, _config(cassandra_server, keyspace))
        insert = db.prepare("INSERT INTO kv (k, v) VALUES (?, ?)", write=True)
        select = db.prepare("SELECT v FROM kv WHERE k = ?")
        await db.execute_many(insert, [(f"k{i}", i) for i in range(300)])
        rows = await db.execute_many(select, [("k7",), ("k299",), ("nope",)])
        assert [[r.v for r in page] for page in rows] == [[7], [299], []]
        # A statement with more rows than one page still returns them all.
        select_all = db.prepare("SELECT k FROM kv")
        select_all.fetch_size = 50
        assert len(await db.execute(select_all)) == 300
        # Values are bound, never spliced into CQL: a crafted string is just data.
        crafted = "x'); DROP TABLE kv; --"
        await db.execute(insert, (crafted, 1))
        assert [r.v for r in await db.execute(select, (crafted,))] == [1]
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        session.cluster.shutdown()


def test_config_rejects_unsafe_keyspace_and_unknown_consistency() -> None:
    with pytest.raises(ValueError, match="not a valid CQL identifier"):
        CassandraConfig(cassandra_keyspace="x; DROP KEYSPACE system")
    with pytest.raises(ValueError, match="not a consistency level"):
        CassandraConfig(cassandra_read_consistency="MOSTLY")


async def test_batches_serialize_values_as_bind_would(cassandra_server) -> None:  # type: ignore[no-untyped-def]
    keyspace = f"libs_{uuid.uuid4().hex[:8]}"
    session = connect(_config(cassandra_server, keyspace))
    try:
        session.execute(
            "CREATE TABLE IF NOT EXISTS typed (k text, n bigint, i int, b blob, d double, "
            "tags list<text>, PRIMARY KEY (k, n))"
        )
        db = AsyncCassandra(session, _config(cassandra_server, keyspace))
        insert = db.prepare(
            "INSERT INTO typed (k, n, i, b, d, tags) VALUES (?, ?, ?, ?, ?, ?) USING TTL ?", write=True
        )
        rows: list[tuple[Any, ...]] = [
            ("ключ", -(2**63) + i, 2**31 - 1 - i, bytes([i]) * 3, i / 4, [f"t{i}", "ü"], 3600)
            for i in range(5)
        ]
        rows.append(("ключ", 99, None, None, None, None, 0))  # nulls
        await db.execute_batch([(insert, row) for row in rows])
        found = await db.execute(
            db.prepare("SELECT n, i, b, d, tags, TTL(i) AS ttl FROM typed WHERE k = ?"), ("ключ",)
        )
        assert [(r.n, r.i, r.b, r.d, r.tags) for r in found] == [row[1:6] for row in rows]
        assert [r.ttl is not None and 0 < r.ttl <= 3600 for r in found] == [True] * 5 + [False]
        # A value of the wrong type fails the batch, as the driver's own binding does.
        with pytest.raises(TypeError, match=r"column \"n\""):
            await db.execute_batch([(insert, ("k", "not a number", 1, b"", 0.0, [], 0))])
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        session.cluster.shutdown()
