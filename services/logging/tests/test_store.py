"""The Cassandra store's writes: batches under Cassandra's limits, one partition per by-model batch, the
record's bytes stored once, and the by-request rows written only after the by-model rows they lead to.

The store runs on a small fake of AsyncCassandra that records what it is asked to execute (the store's
own grouping and ordering are under test; Cassandra's answers are in tests/integration/logging).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from services.logging.store import (
    HOUR_US,
    MAX_BATCH_BYTES,
    MAX_BATCH_STATEMENTS,
    CassandraLogStore,
    StoredRecord,
    _chunks,
    _composite_key,
    _weight_by_model,
    _weight_by_request,
)

T0 = 1_780_000_000_000_000


@dataclass(frozen=True)
class _Statement:
    cql: str


@dataclass
class _Metadata:
    hosts: list[str]

    def all_hosts(self) -> list[str]:
        return list(self.hosts)

    def get_replicas(self, keyspace: str, key: bytes) -> list[str]:
        return [self.hosts[sum(key) % len(self.hosts)]]


@dataclass
class _RecordingCassandra:
    """Prepares statements as their CQL text; every execution is recorded as (statement, rows, batched)."""

    hosts: list[str] = field(default_factory=lambda: ["node1"])
    calls: list[tuple[_Statement, list[Sequence[Any]], bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.session = SimpleNamespace(cluster=SimpleNamespace(metadata=_Metadata(self.hosts)), keyspace="ks")

    def prepare(self, cql: str, *, write: bool = False) -> _Statement:
        return _Statement(cql)

    async def execute(self, statement: _Statement, params: Sequence[Any] = ()) -> list[Any]:
        self.calls.append((statement, [params], False))
        return []

    async def execute_batch(self, statements: Sequence[tuple[_Statement, Sequence[Any]]]) -> None:
        assert len({s for s, _ in statements}) == 1, "a batch holds one statement's rows"
        self.calls.append((statements[0][0], [p for _, p in statements], True))


def _record(i: int, *, tenant: str = "acme", model: str = "fraud", size: int = 800) -> StoredRecord:
    return StoredRecord(tenant, f"r-{i}", model, "1", T0 + i * 60_000_000, bytes([i % 251]) * size)


def _table(call: tuple[_Statement, list[Sequence[Any]], bool]) -> str:
    return call[0].cql.split()[2]


async def _written(records: list[StoredRecord], *, ttl_s: int = 0, hosts: int = 1) -> _RecordingCassandra:
    """What a store on a recording fake of `hosts` nodes executes to write `records`."""
    db = _RecordingCassandra(hosts=[f"node{i}" for i in range(1, hosts + 1)])
    await CassandraLogStore(db, ttl_s=ttl_s).write(records)  # type: ignore[arg-type]
    return db


async def test_a_write_stores_the_record_once_and_its_locator_after_it() -> None:
    records = [_record(i, model="fraud" if i % 3 else "churn") for i in range(300)]  # 5 hours, 2 models
    db = await _written(records, ttl_s=3600)

    tables = [_table(c) for c in db.calls]
    assert "inference_log_by_tenant_request" in tables
    first_locator = tables.index("inference_log_by_tenant_request")
    assert set(tables[:first_locator]) == {"inference_log_by_tenant_model"}
    assert set(tables[first_locator:]) == {"inference_log_by_tenant_request"}

    by_model = [row for c in db.calls[:first_locator] for row in c[1]]
    locators = [row for c in db.calls[first_locator:] for row in c[1]]
    assert sorted(by_model, key=lambda row: row[4]) == sorted(
        ((r.tenant, r.model, r.request_time_us // HOUR_US, r.request_time_us, r.request_id, r.model_version,
          r.payload, 3600, r.request_time_us) for r in records),
        key=lambda row: row[4],
    )  # fmt: skip
    assert sorted(locators, key=lambda row: row[1]) == sorted(
        ((r.tenant, r.request_id, r.model, r.request_time_us, 3600, r.request_time_us) for r in records),
        key=lambda row: row[1],
    )
    assert all(not isinstance(value, bytes) for row in locators for value in row)  # the bytes go once


async def test_by_model_batches_hold_one_partition_and_stay_under_the_limits() -> None:
    db = await _written([_record(i, tenant=("acme", "globex")[i % 2]) for i in range(400)])
    for call in db.calls:
        _, rows, batched = call
        if _table(call) == "inference_log_by_tenant_model":
            assert len({(row[0], row[1], row[2]) for row in rows}) == 1
            assert sum(_weight_by_model(row) for row in rows) <= MAX_BATCH_BYTES or not batched
        else:
            assert sum(_weight_by_request(row) for row in rows) <= MAX_BATCH_BYTES
        assert len(rows) <= MAX_BATCH_STATEMENTS
        assert batched == (len(rows) > 1)


async def test_locators_are_batched_by_owning_replica_on_a_cluster() -> None:
    db = await _written([_record(i) for i in range(200)], hosts=3)
    metadata = db.session.cluster.metadata
    locator_calls = [c for c in db.calls if _table(c) == "inference_log_by_tenant_request"]
    assert sum(len(rows) for _, rows, _ in locator_calls) == 200
    for _, rows, _ in locator_calls:
        owners = {metadata.get_replicas("ks", _composite_key(row[0], row[1]))[0] for row in rows}
        assert len(owners) == 1
    assert len(locator_calls) >= 3


async def test_a_record_too_big_for_a_batch_is_written_alone() -> None:
    big = _record(1, size=MAX_BATCH_BYTES * 2)
    db = await _written([_record(0), big, _record(2)])
    holding = [(rows, batched) for _, rows, batched in db.calls if any(big.payload in row for row in rows)]
    assert len(holding) == 1
    rows, batched = holding[0]
    assert (len(rows), batched) == (1, False)


def test_chunks_keep_every_row_in_order_under_the_limits() -> None:
    rows = [("t", "fraud", 1, i, f"req-{i}", "1", b"x" * (100 + i % 900), 0, i) for i in range(2000)]
    chunks = _chunks(list(rows), _weight_by_model)
    assert [row for chunk in chunks for row in chunk] == rows
    for chunk in chunks:
        assert len(chunk) <= MAX_BATCH_STATEMENTS
        assert sum(_weight_by_model(row) for row in chunk) <= MAX_BATCH_BYTES


def test_small_rows_are_capped_by_the_statement_count() -> None:
    rows = [("t", f"req-{i}", "fraud", i, 0, i) for i in range(1000)]
    chunks = _chunks(list(rows), _weight_by_request)
    assert [len(c) for c in chunks] == [MAX_BATCH_STATEMENTS] * 5


def test_one_oversized_row_still_gets_a_batch_of_its_own() -> None:
    big = ("t", "fraud", 0, 0, "req", "1", b"x" * (MAX_BATCH_BYTES * 2), 0, 0)
    small = ("t", "fraud", 0, 0, "a", "1", b"x", 0, 0)
    assert _chunks([small, big], _weight_by_model) == [[small], [big]]
