"""Cassandra access shared by the services: one session per process, prepared statements, asyncio calls.

The DataStax driver runs its own I/O thread (libev); `AsyncCassandra.execute`
bridges its ResponseFuture into the running asyncio loop, bounded by a
semaphore so a burst cannot queue unbounded work in the driver. Statements are
always prepared (never string-built CQL), the load-balancing policy is
token-aware over the local data center, and consistency levels are configured
per read and write.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cassandra import ConsistencyLevel, cqltypes
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, ResponseFuture, Session
from cassandra.policies import DCAwareRoundRobinPolicy, ExponentialReconnectionPolicy, TokenAwarePolicy
from cassandra.query import BatchStatement, BatchType, BoundStatement, PreparedStatement

from libs.config import secret

log = logging.getLogger(__name__)

# v4, not v5: v5 checksums every frame segment in the driver's Python I/O thread (~10 % of the logging
# consumer's samples in bench/results/latest/analysis.md, "Logging throughput"); side by side in one process,
# the log store's writes cost 18.2 us of client CPU per record on v4 against 20.8 on v5, Cassandra's CPU the
# same within its noise. Nothing here uses v5's additions (per-query keyspace, now_in_seconds).
PROTOCOL_VERSION = 4
_IDENTIFIER = re.compile(r"^[a-zA-Z][a-zA-Z0-9_]{0,47}$")


@dataclass(frozen=True)
class CassandraConfig:
    """Where Cassandra is and how to talk to it; read with the service's prefix + CASSANDRA_*."""

    cassandra_contact_points: tuple[str, ...] = ("127.0.0.1",)
    cassandra_port: int = 9042
    cassandra_keyspace: str = "infergrid"
    cassandra_local_dc: str = "datacenter1"
    # CQL replication map used when the keyspace is created: SimpleStrategy locally,
    # NetworkTopologyStrategy ({'class': 'NetworkTopologyStrategy', 'dc1': 3}) in clusters.
    cassandra_replication: str = "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    cassandra_read_consistency: str = "LOCAL_ONE"
    cassandra_write_consistency: str = "LOCAL_QUORUM"
    cassandra_request_timeout_s: float = 2.0
    cassandra_connect_timeout_s: float = 10.0
    # Concurrent requests one process keeps in flight; more wait their turn.
    cassandra_max_in_flight: int = 128
    cassandra_username: str = ""
    cassandra_password: str = secret("")

    def __post_init__(self) -> None:
        if not _IDENTIFIER.match(self.cassandra_keyspace):
            raise ValueError(f"cassandra_keyspace {self.cassandra_keyspace!r} is not a valid CQL identifier")
        for name in ("cassandra_read_consistency", "cassandra_write_consistency"):
            if getattr(self, name).upper() not in ConsistencyLevel.name_to_value:
                raise ValueError(f"{name} {getattr(self, name)!r} is not a consistency level")


def consistency(name: str) -> int:
    """The driver's consistency level constant for a name such as 'LOCAL_QUORUM'."""
    return int(ConsistencyLevel.name_to_value[name.upper()])


def connect(config: CassandraConfig, *, create_keyspace: bool = True) -> Session:
    """Opens a session (blocking; call at start-up), creating the keyspace when asked.

    Returns:
        A session bound to the keyspace.
    """
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=config.cassandra_local_dc)),
        consistency_level=consistency(config.cassandra_read_consistency),
        request_timeout=config.cassandra_request_timeout_s,
    )
    auth = None
    if config.cassandra_username:
        auth = PlainTextAuthProvider(config.cassandra_username, config.cassandra_password)
    cluster = Cluster(
        contact_points=list(config.cassandra_contact_points),
        port=config.cassandra_port,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        protocol_version=PROTOCOL_VERSION,
        auth_provider=auth,
        connect_timeout=config.cassandra_connect_timeout_s,
    )
    session = cluster.connect()
    # Only when missing: a service's role may create tables in its keyspace but no keyspace, and even
    # CREATE KEYSPACE IF NOT EXISTS needs that permission.
    if create_keyspace and config.cassandra_keyspace not in cluster.metadata.keyspaces:
        # Identifiers cannot be bound as parameters; the keyspace name is validated above.
        session.execute(
            f"CREATE KEYSPACE IF NOT EXISTS {config.cassandra_keyspace} "
            f"WITH replication = {config.cassandra_replication}"
        )
    session.set_keyspace(config.cassandra_keyspace)
    return session


class AsyncCassandra:
    """Prepared statements executed from asyncio with bounded concurrency."""

    def __init__(self, session: Session, config: CassandraConfig) -> None:
        self.session = session
        self._read_cl = consistency(config.cassandra_read_consistency)
        self._write_cl = consistency(config.cassandra_write_consistency)
        self._timeout = config.cassandra_request_timeout_s
        self._slots = asyncio.Semaphore(config.cassandra_max_in_flight)

    def prepare(self, cql: str, *, write: bool = False) -> PreparedStatement:
        """Prepares `cql` (blocking; do it at start-up) with the read or write consistency level."""
        statement = self.session.prepare(cql)
        statement.consistency_level = self._write_cl if write else self._read_cl
        return statement

    async def execute(self, statement: PreparedStatement, params: Sequence[Any] = ()) -> list[Any]:
        """Runs one prepared statement and returns all its rows."""
        async with self._slots:
            future: ResponseFuture = self.session.execute_async(statement, params, timeout=self._timeout)
            return await _wrap(future)

    async def execute_many(
        self, statement: PreparedStatement, params_list: Iterable[Sequence[Any]]
    ) -> list[list[Any]]:
        """Runs a prepared statement once per parameter tuple, concurrently (bounded); results in order."""
        return list(await asyncio.gather(*(self.execute(statement, p) for p in params_list)))

    async def execute_batch(
        self, statements: Sequence[tuple[PreparedStatement, Sequence[Any]]], *, logged: bool = False
    ) -> None:
        """Runs prepared statements as one batch at the write consistency level.

        UNLOGGED (the default) is for statements of one partition, or of partitions on one replica set:
        one round trip instead of many, without the batch log's cost. LOGGED makes a multi-partition
        batch all-or-nothing.
        """
        batch = BatchStatement(
            batch_type=BatchType.LOGGED if logged else BatchType.UNLOGGED,
            consistency_level=self._write_cl,
        )
        bound: BoundStatement | None = None
        columns: list[Callable[[Any], bytes]] = []
        for statement, params in statements:
            if bound is None or bound.prepared_statement is not statement:
                bound, columns = BoundStatement(statement), _serializers(statement)
            try:
                # What PreparedStatement.bind does, at a quarter of its cost (1.3 against 5.5 us a row
                # in-process); the batch keeps each row's list of values, so one BoundStatement serves.
                bound.values = [
                    None if v is None else serialize(v) for serialize, v in zip(columns, params, strict=True)
                ]
                batch.add(bound)
            except (TypeError, ValueError, struct.error):
                batch.add(statement, params)  # unset values, wrong types: the driver's binding and errors
        async with self._slots:
            await _wrap(self.session.execute_async(batch, timeout=self._timeout))


# Serializers of the common column types; any other type uses the driver's own.
_FAST_SERIALIZERS: dict[type, Callable[[Any], bytes]] = {
    cqltypes.VarcharType: str.encode,
    cqltypes.LongType: struct.Struct(">q").pack,
    cqltypes.Int32Type: struct.Struct(">i").pack,
    cqltypes.BytesType: bytes,
}


def _serializers(statement: PreparedStatement) -> list[Callable[[Any], bytes]]:
    """One serializer per bind marker of `statement` (none when a column encryption policy applies)."""
    if statement.column_encryption_policy:
        return []
    version = statement.protocol_version
    return [
        _FAST_SERIALIZERS.get(column.type)
        or functools.partial(column.type.serialize, protocol_version=version)
        for column in statement.column_metadata
    ]


T = TypeVar("T")


class LazySession(Generic[T]):
    """The process's one Cassandra session, connected in the background: start-up never waits for it.

    `kick` starts a connection attempt (retried by the next kick until Cassandra answers); once
    connected, `build` runs once on the session (schema, prepared statements; blocking, so off the
    loop) and its result is `value`. Readiness checks kick and report NOT_SERVING meanwhile; calls
    made before then fail fast (`value` is None) instead of waiting.
    """

    def __init__(self, config: CassandraConfig, build: Callable[[AsyncCassandra], T]) -> None:
        self._config = config
        self._build = build
        self._task: asyncio.Task[None] | None = None
        self._session: Session | None = None
        self.value: T | None = None

    def kick(self) -> None:
        """Starts connecting unless connected or already trying."""
        if self.value is None and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._connect(), name="cassandra-connect")

    async def open(self) -> T:
        """Connects now and returns the built value (tools that have nothing to do without Cassandra).

        Raises:
            NoHostAvailable: Cassandra cannot be reached.
        """
        if self.value is None:
            self.value = await asyncio.to_thread(self._open)
        return self.value

    def _open(self) -> T:
        session = connect(self._config)
        try:
            value = self._build(AsyncCassandra(session, self._config))
        except BaseException:
            session.cluster.shutdown()
            raise
        # Reconnect within seconds once Cassandra is back (the driver's default waits up to 10 minutes).
        session.cluster.reconnection_policy = ExponentialReconnectionPolicy(0.5, 4.0)
        self._session = session
        return value

    async def _connect(self) -> None:
        try:
            await self.open()
        except Exception as exc:
            log.warning("Cassandra is not reachable yet: %s", exc)
            return
        log.info("connected to Cassandra %s", ",".join(self._config.cassandra_contact_points))

    async def close(self) -> None:
        """Stops connecting and shuts the session down."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._session is not None:
            await asyncio.to_thread(self._session.cluster.shutdown)


def _wrap(future: ResponseFuture) -> asyncio.Future[list[Any]]:
    """An asyncio future completed, from the driver's thread, with every row of `future`."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[list[Any]] = loop.create_future()
    rows: list[Any] = []

    def _done(page: list[Any] | None) -> None:
        if page:  # None for statements without rows (INSERT, UPDATE)
            rows.extend(page)
        if future.has_more_pages:
            future.start_fetching_next_page()
        else:
            loop.call_soon_threadsafe(_settle, None)

    def _settle(exc: BaseException | None) -> None:
        if result.done():
            return
        if exc is None:
            result.set_result(rows)
        else:
            result.set_exception(exc)

    future.add_callbacks(_done, lambda exc: loop.call_soon_threadsafe(_settle, exc))
    return result
