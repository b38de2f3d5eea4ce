"""The Cassandra log store against a real Cassandra: records keyed by (tenant, request_id), one rule for reuse."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from infergrid.logging.v1 import logging_pb2
from libs.cassandra import AsyncCassandra, connect
from services.logging.store import CassandraLogStore, RecordQuery, StoredRecord, create_schema
from stack.cassandra import Cassandra

pytestmark = pytest.mark.integration

T0 = 1_780_000_000_000_000
HOUR_US = 3_600_000_000


def _stored(tenant: str, request_id: str, version: str, time_us: int) -> StoredRecord:
    record = logging_pb2.InferenceLogRecord(
        request_id=request_id, tenant=tenant, model="fraud", model_version=version
    )
    record.request_time.FromMicroseconds(time_us)
    return StoredRecord(tenant, request_id, "fraud", version, time_us, record.SerializeToString())


def _version(payload: bytes | None) -> str | None:
    return None if payload is None else logging_pb2.InferenceLogRecord.FromString(payload).model_version


@pytest.fixture
async def store(cassandra_server: Cassandra) -> AsyncIterator[CassandraLogStore]:
    config = cassandra_server.admin_config(
        f"logstore_{uuid.uuid4().hex[:12]}", cassandra_request_timeout_s=10.0
    )
    loop = asyncio.get_running_loop()
    session = await loop.run_in_executor(None, connect, config)
    db = AsyncCassandra(session, config)
    await loop.run_in_executor(None, create_schema, db)
    yield await loop.run_in_executor(None, CassandraLogStore, db)
    await loop.run_in_executor(
        None, lambda: session.execute(f"DROP KEYSPACE IF EXISTS {config.cassandra_keyspace}", timeout=60)
    )
    session.cluster.shutdown()


async def _all(store: CassandraLogStore, tenant: str) -> list[tuple[str, str]]:
    page = await store.query(RecordQuery(tenant, "fraud", "", T0 - HOUR_US, T0 + 3 * HOUR_US, 1000))
    records = [logging_pb2.InferenceLogRecord.FromString(p) for p in page.payloads]
    assert all(r.tenant == tenant for r in records)
    return [(r.request_id, r.model_version) for r in records]


async def test_two_tenants_with_one_id_are_two_records_and_resends_are_one(store: CassandraLogStore) -> None:
    acme, globex = _stored("acme", "r-1", "1", T0), _stored("globex", "r-1", "2", T0 + 10)
    await store.write([acme, globex])
    await store.write([acme, _stored("acme", "r-2", "1", T0 + HOUR_US)])  # acme's r-1 re-sent
    assert (_version(await store.get("acme", "r-1")), _version(await store.get("globex", "r-1"))) == (
        "1",
        "2",
    )
    assert await store.get("globex", "r-2") is None
    assert await _all(store, "acme") == [("r-1", "1"), ("r-2", "1")]
    assert await _all(store, "globex") == [("r-1", "2")]


async def test_a_reused_id_keeps_the_later_request_time_whatever_the_arrival_order(
    store: CassandraLogStore,
) -> None:
    early, late = _stored("acme", "r-9", "1", T0), _stored("acme", "r-9", "2", T0 + 1000)
    await store.write([late])
    await store.write([early])  # arrives last (a re-send from a spool), but is the earlier prediction
    assert _version(await store.get("acme", "r-9")) == "2"  # as the lake's reader keeps it


async def test_an_id_executed_twice_is_queried_once_at_its_later_time(store: CassandraLogStore) -> None:
    # A request Envoy retried after a per-try timeout while the first attempt still ran: two executions,
    # two records at two request times (one hour apart here, so in two partitions of the by-model table).
    first, retried = _stored("acme", "r-7", "1", T0), _stored("acme", "r-7", "2", T0 + HOUR_US)
    await store.write([first, _stored("acme", "r-8", "1", T0 + 5)])
    await store.write([retried])
    assert await _all(store, "acme") == [("r-8", "1"), ("r-7", "2")]


# The by-request table as versions before the locator rows created it (the record's bytes in both tables).
_EARLIER_BY_REQUEST = """CREATE TABLE inference_log_by_tenant_request (
    tenant text, request_id text, model text, model_version text, request_time_us bigint, record blob,
    PRIMARY KEY ((tenant, request_id)))"""


async def test_a_keyspace_written_by_earlier_versions_reads_the_same(store: CassandraLogStore) -> None:
    session = store._db.session
    old = _stored("acme", "r-old", "1", T0)

    def earlier_table() -> CassandraLogStore:
        session.execute("DROP TABLE inference_log_by_tenant_request", timeout=60)
        session.execute(_EARLIER_BY_REQUEST, timeout=60)
        return CassandraLogStore(store._db)

    current = await asyncio.get_running_loop().run_in_executor(None, earlier_table)
    await current.write([old])  # the by-model row as every version wrote it (and a locator in the old table)
    insert = await asyncio.get_running_loop().run_in_executor(
        None,
        session.prepare,
        "INSERT INTO inference_log_by_tenant_request "
        "(tenant, request_id, model, model_version, request_time_us, record) VALUES (?, ?, ?, ?, ?, ?) "
        "USING TIMESTAMP ?",
    )
    await store._db.execute(insert, (*old, old.request_time_us))  # the earlier version's row, bytes included
    assert await current.get("acme", "r-old") == old.payload
    assert await _all(current, "acme") == [("r-old", "1")]
    await current.write([_stored("acme", "r-old", "2", T0 + 1000)])  # the id reused later
    assert _version(await current.get("acme", "r-old")) == "2"
    assert await _all(current, "acme") == [("r-old", "2")]
