"""The online store: the latest feature values per entity, in Cassandra.

Data model: one table for all views, one partition (and one row) per entity per
view. The row's `cells` map holds every feature of the entity: feature name →
8-byte event time + serialized Value. Writes are `UPDATE ... USING TTL ? AND
TIMESTAMP ? SET cells = cells + ?`: they touch only the features they carry,
each cell expires by itself, and the event time is the cell's write timestamp,
so the newest event wins whatever order updates arrive in and rewriting the
same data is a no-op. One `SELECT ... WHERE view_name = ? AND entity_key IN ?` reads
a chunk of entities in one round trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, Protocol, TypeVar

from cassandra import DriverException, InvalidRequest, RequestExecutionException
from cassandra.cluster import NoHostAvailable

from infergrid.features.v1 import features_pb2
from libs.cassandra import AsyncCassandra, CassandraConfig, LazySession
from libs.telemetry import tracer
from services.features.codec import Record
from services.features.config import StoreConfig
from services.features.errors import InvalidArgument, StoreUnavailable
from services.features.metrics import ROWS_READ, ROWS_WRITTEN, cassandra_seconds, db_duration
from services.features.registry import View

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
T = TypeVar("T")


# Cassandra refuses TTLs above 20 years.
_MAX_TTL_S = 630_720_000
# Cassandra's clock may be ahead of ours: TTLs end this long before its latest expiration time.
_EXPIRATION_MARGIN_S = 86_400

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS feature_values (
        view_name text,
        entity_key blob,
        cells map<text, blob>,
        PRIMARY KEY ((view_name, entity_key))
    ) WITH compaction = {'class': 'SizeTieredCompactionStrategy'}""",
    """CREATE TABLE IF NOT EXISTS feature_views (
        name text PRIMARY KEY,
        spec blob,
        revision bigint
    )""",
)


class WriteRow(NamedTuple):
    """One entity's new values: feature name → cell (see codec.cell), all observed at `event_us`."""

    key: bytes
    cells: dict[str, bytes]
    event_us: int


class OnlineStore(Protocol):
    """Latest values per entity and view."""

    async def read(self, view: View, keys: Sequence[bytes]) -> dict[bytes, Record]:
        """The records of the entities that have values; absent keys have none."""
        ...

    async def write(self, view: View, rows: Sequence[WriteRow]) -> None:
        """Upserts the rows' values (the newest event time wins per feature)."""
        ...

    async def ping(self) -> None:
        """Returns when the store answers; raises StoreUnavailable otherwise."""
        ...


def cassandra_ttl(
    view_ttl_us: int,
    event_us: int,
    now_us: int,
    retention_s: int,
    max_expiration_s: int = 2_147_483_646,
) -> int:
    """Seconds Cassandra keeps a value: until the view's TTL passes, plus `retention_s` (0: forever).

    Values are kept a while after they expire so that reads can say EXPIRED
    rather than NOT_FOUND; a value older than its TTL is never served as present.
    A TTL Cassandra would refuse (over 20 years, or ending after `max_expiration_s`)
    is not sent: the value is kept without one, and reads still apply the view's TTL.
    """
    if view_ttl_us <= 0:
        return 0
    remaining_s = (event_us + view_ttl_us - now_us) // 1_000_000
    ttl = max(1, max(0, remaining_s) + retention_s)
    limit = min(_MAX_TTL_S, max_expiration_s - _EXPIRATION_MARGIN_S - now_us // 1_000_000)
    return ttl if ttl <= limit else 0


async def _unavailable_on_driver_error(op: str, call: Awaitable[T]) -> T:
    started = time.perf_counter()
    try:
        return await call
    except InvalidRequest as exc:
        # Cassandra answered, and blamed the request (a value out of its range): the caller's error,
        # never a store failure, so that it cannot open the breaker that guards reads. Writes are
        # checked before they get here (write_bounds); this is the last line.
        log.warning("Cassandra refused a %s: %s", op, str(exc)[:500])
        raise InvalidArgument(f"rows: the store refused the {op}: {_cassandra_reason(exc)}") from exc
    except (NoHostAvailable, RequestExecutionException, DriverException, OSError) as exc:
        raise StoreUnavailable(f"Cassandra {op} failed: {type(exc).__name__}") from exc
    finally:
        elapsed = time.perf_counter() - started
        cassandra_seconds(op).observe(elapsed)
        db_duration("cassandra", op).observe(elapsed)


def _attributes(view: View, entities: int) -> dict[str, str | int]:
    """A read's or a write's span attributes."""
    return {"db.system": "cassandra", "infergrid.feature_view": view.name, "infergrid.entities": entities}


def _cassandra_reason(exc: InvalidRequest) -> str:
    """Cassandra's own words, without the driver's wrapping (`Error from server: code=2200 ...`)."""
    text = str(exc)
    start = text.find('message="')
    if start >= 0:
        text = text[start + 9 :].rstrip('"}')
    return text[:300]


class CassandraOnlineStore:
    """The OnlineStore on Cassandra (prepared statements, bounded async execution, token-aware)."""

    def __init__(
        self, db: AsyncCassandra, config: StoreConfig, clock: Callable[[], float] = time.time
    ) -> None:
        """Prepares the statements (blocking: call at start-up, off the event loop)."""
        self._db = db
        self._chunk = config.store_read_chunk
        self._retention_s = config.store_expired_retention_s
        self._max_expiration_s = config.store_max_expiration_s
        self._clock = clock
        self._read = db.prepare(
            "SELECT entity_key, cells FROM feature_values WHERE view_name = ? AND entity_key IN ?"
        )
        self._write = db.prepare(
            "UPDATE feature_values USING TTL ? AND TIMESTAMP ? SET cells = cells + ? "
            "WHERE view_name = ? AND entity_key = ?",
            write=True,
        )
        self._ping = db.prepare("SELECT release_version FROM system.local")

    async def read(self, view: View, keys: Sequence[bytes]) -> dict[bytes, Record]:
        chunks = [list(keys[i : i + self._chunk]) for i in range(0, len(keys), self._chunk)]
        with _tracer.start_as_current_span("cassandra read", attributes=_attributes(view, len(keys))):
            results = await _unavailable_on_driver_error(
                "read", asyncio.gather(*(self._db.execute(self._read, (view.name, c)) for c in chunks))
            )
        names = view.feature_names
        out: dict[bytes, Record] = {}
        for rows in results:
            for row in rows:
                if row.cells:
                    out[row.entity_key] = Record.from_cells(names, row.cells)
        ROWS_READ.labels(view.name).inc(len(out))
        return out

    async def write(self, view: View, rows: Sequence[WriteRow]) -> None:
        now_us = int(self._clock() * 1_000_000)
        params = [
            (
                cassandra_ttl(view.ttl_us, row.event_us, now_us, self._retention_s, self._max_expiration_s),
                row.event_us,
                row.cells,
                view.name,
                row.key,
            )
            for row in rows
        ]
        with _tracer.start_as_current_span("cassandra write", attributes=_attributes(view, len(rows))):
            await _unavailable_on_driver_error("write", self._db.execute_many(self._write, params))
        ROWS_WRITTEN.labels(view.name).inc(len(rows))

    async def ping(self) -> None:
        await _unavailable_on_driver_error("ping", self._db.execute(self._ping))


class CassandraViewStore:
    """The registry's ViewStore on Cassandra; changes are lightweight transactions on the revision."""

    def __init__(self, db: AsyncCassandra) -> None:
        """Prepares the statements (blocking)."""
        self._db = db
        self._all = db.prepare("SELECT spec FROM feature_views")
        self._create = db.prepare(
            "INSERT INTO feature_views (name, spec, revision) VALUES (?, ?, ?) IF NOT EXISTS", write=True
        )
        self._update = db.prepare(
            "UPDATE feature_views SET spec = ?, revision = ? WHERE name = ? IF revision = ?", write=True
        )

    async def load_all(self) -> list[features_pb2.FeatureView]:
        rows = await _unavailable_on_driver_error("views", self._db.execute(self._all))
        return [features_pb2.FeatureView.FromString(row.spec) for row in rows]

    async def create(self, view: features_pb2.FeatureView) -> bool:
        rows = await _unavailable_on_driver_error(
            "views", self._db.execute(self._create, (view.name, view.SerializeToString(), view.revision))
        )
        return bool(rows[0][0])

    async def update(self, view: features_pb2.FeatureView, expected_revision: int) -> bool:
        rows = await _unavailable_on_driver_error(
            "views",
            self._db.execute(
                self._update, (view.SerializeToString(), view.revision, view.name, expected_revision)
            ),
        )
        return bool(rows[0][0])


class LazyCassandraStore:
    """The OnlineStore and the registry's ViewStore on the process's one lazily connected session.

    Connecting (and creating the tables) happens in the background (libs.cassandra.LazySession);
    until it has, every call fails fast with UNAVAILABLE and starts another attempt.
    """

    def __init__(self, cassandra: CassandraConfig, store: StoreConfig) -> None:
        self.session = LazySession(cassandra, lambda db: _open_stores(db, store))

    def _stores(self) -> tuple[CassandraOnlineStore, CassandraViewStore]:
        stores = self.session.value
        if stores is None:
            self.session.kick()
            raise StoreUnavailable("Cassandra is not connected yet")
        return stores

    async def read(self, view: View, keys: Sequence[bytes]) -> dict[bytes, Record]:
        return await self._stores()[0].read(view, keys)

    async def write(self, view: View, rows: Sequence[WriteRow]) -> None:
        await self._stores()[0].write(view, rows)

    async def ping(self) -> None:
        await self._stores()[0].ping()

    async def load_all(self) -> list[features_pb2.FeatureView]:
        return await self._stores()[1].load_all()

    async def create(self, view: features_pb2.FeatureView) -> bool:
        return await self._stores()[1].create(view)

    async def update(self, view: features_pb2.FeatureView, expected_revision: int) -> bool:
        return await self._stores()[1].update(view, expected_revision)


def _open_stores(db: AsyncCassandra, config: StoreConfig) -> tuple[CassandraOnlineStore, CassandraViewStore]:
    """Creates the tables if missing and prepares the statements (blocking)."""
    for ddl in SCHEMA:
        db.session.execute(ddl, timeout=30)
    return CassandraOnlineStore(db, config), CassandraViewStore(db)
