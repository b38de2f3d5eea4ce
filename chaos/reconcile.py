"""Reconciles the requests that were answered OK against the log's two sinks: Cassandra and the Parquet lake.

For every answered-OK request id the caller saw, the record must be in Cassandra
(`inference_log_by_tenant_request`, and once in `inference_log_by_tenant_model`, the table `QueryRecords`
pages) and in the lake exactly once. Records are keyed by (tenant, request_id); the chaos load calls as one
tenant (`TENANT`, the demo key's), so only that tenant's rows are counted, per request id. The lake is
counted twice: as its files hold it (raw rows, where a record the producer re-sent may sit in two flushes)
and as it is read (`services.logging.lake.read_table`, which keeps one row per (tenant, request_id)).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from cassandra import ConsistencyLevel
from cassandra.auth import AuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.query import SimpleStatement

from services.logging.lake import lake_files, read_table

MODEL = "fraud"
# The tenant of the demo API key the chaos load uses (deploy/local/platform.yaml).
TENANT = "demo"


@dataclass(frozen=True)
class SinkCounts:
    """How the answered-OK ids of one scenario were found in the sinks."""

    answered_ok: int
    in_cassandra: int
    in_lake: int
    lost_cassandra: int
    lost_lake: int
    # Ids held more than once as read: Cassandra (GetRecord's table, and QueryRecords' by-model table
    # read as the store reads it: the row at the time GetRecord's row holds), the lake as read.
    duplicated_cassandra: int
    duplicated_lake_read: int
    # Ids stored twice, which the reads above fold into one: rows of two lake flushes (a record the
    # producer re-sent), and by-model rows at two request times (an id executed twice: a request Envoy
    # retried after a per-try timeout while the first attempt still ran).
    duplicated_lake_files: int
    executed_twice: int
    waited_s: float

    @property
    def lost(self) -> int:
        """Answered-OK ids missing from at least one sink."""
        return max(self.lost_cassandra, self.lost_lake)

    @property
    def duplicated(self) -> int:
        """Answered-OK ids held twice in a sink as it is read (Cassandra's tables, the lake via read_table)."""
        return max(self.duplicated_cassandra, self.duplicated_lake_read)


def count_ids(ids: Iterable[str], wanted: Collection[str]) -> collections.Counter[str]:
    """How often each wanted id occurs in `ids`."""
    counts: collections.Counter[str] = collections.Counter()
    for request_id in ids:
        if request_id in wanted:
            counts[request_id] += 1
    return counts


def lake_ids(lake_dir: Path, prefix: str, tenant: str | None = None) -> collections.Counter[str]:
    """Rows per request id over every lake file (no dedupe), for the ids that start with `prefix`.

    Args:
        lake_dir: The lake folder.
        prefix: Only ids starting with it.
        tenant: Only this tenant's rows (None: every tenant's; a run with one tenant counts the same).
    """
    counts: collections.Counter[str] = collections.Counter()
    for path in lake_files(lake_dir, model=MODEL):
        try:
            table = pq.read_table(path, columns=["request_id", "tenant"])
        except (OSError, ValueError):  # a file renamed away by a consumer rebalance: it is read next poll
            continue
        if tenant is not None:
            table = table.filter(pc.equal(table.column("tenant"), tenant))
        column = table.column("request_id")
        counts.update(column.filter(pc.starts_with(column, prefix)).to_pylist())
    return counts


def lake_read_ids(
    lake_dir: Path, prefix: str, wanted: Collection[str], tenant: str | None = None
) -> collections.Counter[str]:
    """Rows per wanted request id in the lake as its readers see it (`read_table`, one per (tenant, id))."""
    column = read_table(lake_dir, model=MODEL, tenant=tenant).column("request_id")
    return count_ids(column.filter(pc.starts_with(column, prefix)).to_pylist(), wanted)


class CassandraSink:
    """Reads one tenant's rows of the log tables of one keyspace (full scans with paging: test traffic only)."""

    def __init__(
        self,
        contact_points: list[str],
        port: int,
        keyspace: str,
        tenant: str = TENANT,
        auth_provider: AuthProvider | None = None,
    ) -> None:
        # Quorum reads: a row written at LOCAL_QUORUM while a node was down is still seen (RF 3).
        profile = ExecutionProfile(consistency_level=ConsistencyLevel.LOCAL_QUORUM, request_timeout=60)
        self._cluster = Cluster(
            contact_points,
            port=port,
            auth_provider=auth_provider,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        )
        self._session: Session = self._cluster.connect(keyspace)
        self.tenant = tenant

    def by_request(self, prefix: str) -> dict[str, list[int]]:
        """Request times per request id of the tenant in `inference_log_by_tenant_request` (GetRecord's)."""
        rows = self._session.execute(
            SimpleStatement(
                "SELECT tenant, request_id, request_time_us FROM inference_log_by_tenant_request",
                fetch_size=5000,
            ),
            timeout=60,
        )
        found: dict[str, list[int]] = collections.defaultdict(list)
        for r in rows:
            if r.tenant == self.tenant and r.request_id.startswith(prefix):
                found[r.request_id].append(r.request_time_us)
        return found

    def by_model(self, prefix: str, hours: Iterable[int]) -> list[tuple[str, int]]:
        """(request id, request time) of each of the tenant's rows in `inference_log_by_tenant_model`."""
        query = self._session.prepare(
            "SELECT request_id, request_time_us FROM inference_log_by_tenant_model "
            "WHERE tenant = ? AND model = ? AND hour = ?"
        )
        query.fetch_size = 5000
        return [
            (row.request_id, row.request_time_us)
            for hour in hours
            for row in self._session.execute(query, (self.tenant, MODEL, hour), timeout=60)
            if row.request_id.startswith(prefix)
        ]

    def close(self) -> None:
        self._cluster.shutdown()


def reconcile(
    ok_ids: Collection[str],
    prefix: str,
    *,
    cassandra: CassandraSink,
    lake_dir: Path,
    hours: Iterable[int],
    timeout_s: float,
    poll_s: float = 3.0,
    say: Callable[[str], None] = lambda _m: None,
) -> SinkCounts:
    """Waits until every answered-OK id is in both sinks (or `timeout_s` passed) and counts the result."""
    wanted = set(ok_ids)
    hours = list(hours)
    t0 = time.monotonic()
    while True:
        by_request = cassandra.by_request(prefix)
        in_cassandra = {i: len(by_request[i]) for i in wanted if i in by_request}
        lake_files_counts = count_ids(lake_ids(lake_dir, prefix, cassandra.tenant).elements(), wanted)
        missing_c = len(wanted) - len(in_cassandra)
        missing_l = len(wanted) - len(lake_files_counts)
        waited = time.monotonic() - t0
        if (missing_c == 0 and missing_l == 0) or waited >= timeout_s:
            break
        say(f"waiting for the sinks: {missing_c} id(s) not yet in Cassandra, {missing_l} not yet in the lake")
        time.sleep(poll_s)
    index_rows = [(i, t) for i, t in cassandra.by_model(prefix, hours) if i in wanted]
    stored = collections.Counter(i for i, _ in index_rows)
    # As the store's QueryRecords reads it: only the row at the time GetRecord's row holds.
    as_read = collections.Counter(i for i, t in index_rows if t in by_request.get(i, ()))
    return SinkCounts(
        answered_ok=len(wanted),
        in_cassandra=len(in_cassandra),
        in_lake=len(lake_files_counts),
        lost_cassandra=missing_c,
        lost_lake=missing_l,
        duplicated_cassandra=sum(1 for n in (*in_cassandra.values(), *as_read.values()) if n > 1),
        executed_twice=sum(1 for n in stored.values() if n > 1),
        duplicated_lake_files=sum(1 for n in lake_files_counts.values() if n > 1),
        duplicated_lake_read=sum(
            1 for n in lake_read_ids(lake_dir, prefix, wanted, cassandra.tenant).values() if n > 1
        ),
        waited_s=round(waited, 1),
    )
