"""The record store: the LogStore interface and its Cassandra implementation (by tenant and request id, by model).

A record is identified by (tenant, request_id): request ids are chosen by callers, so
two tenants may use the same one, and neither may overwrite or read the other's record.
Two tables hold every record, both written with upserts keyed by (tenant, request_id),
so writing a record again (a redelivered Kafka message, a re-sent spool record)
changes nothing:

- `inference_log_by_tenant_model`: one partition per (tenant, model, hour of
  request_time), clustered by (request_time_us, request_id), holding the serialized record
  (QueryRecords, oldest first; GetRecord's second read);
- `inference_log_by_tenant_request`: one partition per (tenant, request id) holding only where
  the record is (its model and request time: the by-model row's key), not the record itself
  (GetRecord's first read; QueryRecords' check below). The record's bytes are stored once.
  Rows written by earlier versions also hold `model_version` and `record`; they are no longer
  written nor read (their model and request time lead to the same by-model row).

Every write carries the record's request time as its write timestamp (`USING TIMESTAMP`),
so when a caller reuses its own request id for a different prediction the by-request row
keeps the latest request time whatever the order the records arrive in — the rule the
lake's reader applies too (services/logging/lake.py). (The tables replace the tenant-blind
`inference_log_by_request` / `inference_log_by_model`, which are no longer written; a
keyspace that still has them keeps them untouched.)

One id executed twice (a request Envoy retried after a per-try timeout while the first
attempt still ran, a caller reusing its id) leaves two by-model rows, at two request
times; QueryRecords returns only the row whose time the by-request table holds (the
later one), so every read path shows an id once.

Writes go in UNLOGGED batches that stay cheap for Cassandra: the by-model rows
are grouped by partition; the by-request rows (a few dozen bytes each) by the replica that owns them,
and only once the by-model rows are written, so a by-request row never leads to a missing record.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from cassandra.query import PreparedStatement

from libs.cassandra import AsyncCassandra
from services.logging.paging import Cursor

HOUR_US = 3_600_000_000
# Cassandra refuses batches over batch_size_fail_threshold (50 KiB by default): stay well below.
MAX_BATCH_BYTES = 32 * 1024
MAX_BATCH_STATEMENTS = 200
# QueryRecords stops after this many partition reads and hands back a token to continue.
MAX_READS_PER_QUERY = 200

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS inference_log_by_tenant_request (
        tenant text,
        request_id text,
        model text,
        request_time_us bigint,
        PRIMARY KEY ((tenant, request_id)))""",
    """CREATE TABLE IF NOT EXISTS inference_log_by_tenant_model (
        tenant text,
        model text,
        hour bigint,
        request_time_us bigint,
        request_id text,
        model_version text,
        record blob,
        PRIMARY KEY ((tenant, model, hour), request_time_us, request_id))
       WITH CLUSTERING ORDER BY (request_time_us ASC, request_id ASC)""",
)


class StoredRecord(NamedTuple):
    """What the store keeps of a record: its keys and the serialized InferenceLogRecord (a tuple: cheap per record)."""

    tenant: str
    request_id: str
    model: str
    model_version: str
    request_time_us: int
    payload: bytes


@dataclass(frozen=True)
class RecordQuery:
    """Records of `tenant` for `model` (optionally one version) with start_us <= request_time < end_us."""

    tenant: str
    model: str
    model_version: str
    start_us: int
    end_us: int
    page_size: int
    cursor: Cursor | None = None


@dataclass(frozen=True)
class RecordPage:
    """Serialized records, oldest first, and where the next page starts (None: no more)."""

    payloads: list[bytes]
    next_cursor: Cursor | None


class LogStore(Protocol):
    """Where the logging service keeps records for look-ups."""

    async def write(self, records: Sequence[StoredRecord]) -> None:
        """Stores the records (idempotent: a record written twice is stored once)."""
        ...

    async def get(self, tenant: str, request_id: str) -> bytes | None:
        """The serialized record of a tenant's request, or None (another tenant's record is never returned)."""
        ...

    async def query(self, query: RecordQuery) -> RecordPage:
        """One page of a tenant's records of a model in a time range."""
        ...

    async def ready(self) -> bool:
        """True when the store answers."""
        ...


def _not_a_batch_warning(record: logging.LogRecord) -> bool:
    """Drops the driver's per-request echo of Cassandra's batch warnings, which this store causes on purpose.

    Cassandra warns about unlogged batches over 5 KiB or across more than 10 partitions. Measured on the
    2-core dev box: 32 KiB batches wrote 25-29k records/s (both tables) at ~20 us client CPU per record;
    one statement per row managed 3.4k/s at ~200 us. The server logs the same warning at most once a minute.
    """
    message = record.getMessage()
    return not (
        message.startswith("Server warning:")
        and ("inference_log_by_" in message)
        and ("Unlogged batch" in message or "Batch for" in message)
    )


def hour_of(time_us: int) -> int:
    """The hour bucket (hours since the epoch) of a time in microseconds."""
    return time_us // HOUR_US


def create_schema(cassandra: AsyncCassandra) -> None:
    """Creates the tables when missing (blocking: run at start-up)."""
    for cql in _SCHEMA:
        cassandra.session.execute(cql, timeout=60)


class CassandraLogStore:
    """LogStore on Cassandra (see the module docstring for the tables)."""

    def __init__(self, cassandra: AsyncCassandra, *, ttl_s: int = 0) -> None:
        """Prepares the statements (blocking: build at start-up, after `create_schema`)."""
        self._db = cassandra
        self._ttl = ttl_s
        logging.getLogger("cassandra.protocol").addFilter(_not_a_batch_warning)
        self._insert_by_request = cassandra.prepare(
            "INSERT INTO inference_log_by_tenant_request (tenant, request_id, model, request_time_us) "
            "VALUES (?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?",
            write=True,
        )
        self._insert_by_model = cassandra.prepare(
            "INSERT INTO inference_log_by_tenant_model "
            "(tenant, model, hour, request_time_us, request_id, model_version, record) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?",
            write=True,
        )
        self._select_by_request = cassandra.prepare(
            "SELECT model, request_time_us FROM inference_log_by_tenant_request WHERE tenant = ? AND request_id = ?"
        )
        self._select_record = cassandra.prepare(
            "SELECT record FROM inference_log_by_tenant_model "
            "WHERE tenant = ? AND model = ? AND hour = ? AND request_time_us = ? AND request_id = ?"
        )
        self._select_first = cassandra.prepare(
            "SELECT request_time_us, request_id, model_version, record FROM inference_log_by_tenant_model "
            "WHERE tenant = ? AND model = ? AND hour = ? AND request_time_us >= ? AND request_time_us < ? LIMIT ?"
        )
        self._select_after = cassandra.prepare(
            "SELECT request_time_us, request_id, model_version, record FROM inference_log_by_tenant_model "
            "WHERE tenant = ? AND model = ? AND hour = ? AND (request_time_us, request_id) > (?, ?) "
            "AND (request_time_us, request_id) < (?, ?) LIMIT ?"
        )
        self._select_one = cassandra.prepare("SELECT request_id FROM inference_log_by_tenant_request LIMIT 1")

    async def write(self, records: Sequence[StoredRecord]) -> None:
        """Upserts the records: their by-model rows, then their by-request rows (module docstring)."""
        ttl = self._ttl
        by_model: dict[tuple[str, str, int], list[Sequence[Any]]] = defaultdict(list)
        for tenant, request_id, model, version, time_us, payload in records:
            hour = time_us // HOUR_US
            # The write timestamp is the request time: of two records with one (tenant, id), the later wins.
            by_model[(tenant, model, hour)].append(
                (tenant, model, hour, time_us, request_id, version, payload, ttl, time_us)
            )
        await self._write_groups(self._insert_by_model, by_model.values(), _weight_by_model)
        await self._write_groups(
            self._insert_by_request, self._by_replica(records).values(), _weight_by_request
        )

    async def _write_groups(
        self,
        statement: PreparedStatement,
        groups: Iterable[list[Sequence[Any]]],
        weight: Callable[[Sequence[Any]], int],
    ) -> None:
        """Writes each group's rows in batches of `_chunks`, all groups at once."""
        await asyncio.gather(
            *(self._write_chunk(statement, chunk) for group in groups for chunk in _chunks(group, weight))
        )

    def _by_replica(self, records: Sequence[StoredRecord]) -> dict[object, list[Sequence[Any]]]:
        """The by-request rows grouped by the first replica owning each (one group on a one-node cluster)."""
        ttl = self._ttl
        # (tenant, request_id, model, request_time_us), TTL, TIMESTAMP
        rows: list[Sequence[Any]] = [(r[0], r[1], r[2], r[4], ttl, r[4]) for r in records]
        metadata = self._db.session.cluster.metadata
        if len(metadata.all_hosts()) <= 1:
            return {None: rows}
        groups: dict[object, list[Sequence[Any]]] = defaultdict(list)
        keyspace = self._db.session.keyspace
        for row in rows:
            replicas = metadata.get_replicas(keyspace, _composite_key(row[0], row[1]))
            groups[replicas[0] if replicas else None].append(row)
        return groups

    async def _write_chunk(self, statement: PreparedStatement, chunk: list[Sequence[Any]]) -> None:
        if len(chunk) == 1:  # a lone statement (maybe one big record): no batch, no batch size limit
            await self._db.execute(statement, chunk[0])
        else:
            await self._db.execute_batch([(statement, params) for params in chunk])

    async def get(self, tenant: str, request_id: str) -> bytes | None:
        """The serialized record of `tenant`'s `request_id`, or None: where it is, then the record."""
        rows = await self._db.execute(self._select_by_request, (tenant, request_id))
        if not rows:
            return None
        model, time_us = rows[0].model, rows[0].request_time_us
        found = await self._db.execute(
            self._select_record, (tenant, model, hour_of(time_us), time_us, request_id)
        )
        return bytes(found[0].record) if found else None

    async def query(self, query: RecordQuery) -> RecordPage:
        """Walks the hour partitions from the cursor on, filtering by version, until the page is full."""
        last_hour = hour_of(query.end_us - 1)
        cursor = query.cursor or Cursor(hour=hour_of(query.start_us))
        hour, after_time, after_id = cursor.hour, cursor.after_time_us, cursor.after_request_id
        payloads: list[bytes] = []
        reads = 0
        while len(payloads) < query.page_size:
            if hour > last_hour:
                return RecordPage(payloads, None)
            if reads >= MAX_READS_PER_QUERY:
                break
            limit = query.page_size - len(payloads)
            if after_time is None:
                rows = await self._db.execute(
                    self._select_first, (query.tenant, query.model, hour, query.start_us, query.end_us, limit)
                )
            else:
                rows = await self._db.execute(
                    self._select_after,
                    (query.tenant, query.model, hour, after_time, after_id, query.end_us, "", limit),
                )
            reads += 1
            current = await self._current(query.tenant, rows)
            for row, keep in zip(rows, current, strict=True):
                after_time, after_id = row.request_time_us, row.request_id
                if keep and (not query.model_version or row.model_version == query.model_version):
                    payloads.append(bytes(row.record))
            if len(rows) < limit:
                hour, after_time, after_id = hour + 1, None, ""
        return RecordPage(payloads, Cursor(hour, after_time, after_id))

    async def _current(self, tenant: str, rows: Sequence[Any]) -> list[bool]:
        """Whether each by-model row is its id's current record: the one `inference_log_by_tenant_request`
        holds (an id executed twice, e.g. a request Envoy retried after a per-try timeout, leaves two rows
        in the by-model table at two request times; the later one is the record, as in the lake)."""
        ids = {row.request_id for row in rows}
        found = await asyncio.gather(*(self._db.execute(self._select_by_request, (tenant, i)) for i in ids))
        times = {i: (r[0].request_time_us if r else None) for i, r in zip(ids, found, strict=True)}
        return [times[row.request_id] in (None, row.request_time_us) for row in rows]

    async def ready(self) -> bool:
        """True when Cassandra answers a read."""
        await self._db.execute(self._select_one)
        return True


def _composite_key(*parts: str) -> bytes:
    """The routing key of a partition key of several text columns (Cassandra's composite encoding)."""
    return b"".join(len(p.encode()).to_bytes(2, "big") + p.encode() + b"\x00" for p in parts)


def _weight_by_model(params: Sequence[Any]) -> int:
    """A by-model row's share of a batch: the record dominates; ids and names fit in the margin."""
    return 256 + len(params[6])


def _weight_by_request(params: Sequence[Any]) -> int:
    """A by-request row's share of a batch (no record: ids, model name, two longs and the margin)."""
    return 128 + len(params[0]) + len(params[1]) + len(params[2])


def _chunks(rows: list[Sequence[Any]], weight: Callable[[Sequence[Any]], int]) -> list[list[Sequence[Any]]]:
    """Splits one statement's parameter rows into batches under MAX_BATCH_BYTES and MAX_BATCH_STATEMENTS."""
    out: list[list[Sequence[Any]]] = []
    current: list[Sequence[Any]] = []
    size = 0
    for row in rows:
        w = weight(row)
        if current and (size + w > MAX_BATCH_BYTES or len(current) >= MAX_BATCH_STATEMENTS):
            out.append(current)
            current, size = [], 0
        current.append(row)
        size += w
    if current:
        out.append(current)
    return out
