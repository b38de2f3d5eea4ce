"""Online reads and writes: request validation, the cache in front of the store, expiry, degradation.

`OnlineFeatures` is the domain behind GetOnlineFeatures and WriteFeatures (and the
ingestion paths). A read resolves feature references to views, builds one entity
key per view and row, asks the cache for all of them in one round trip, reads the
misses from the store (one query per chunk of entities), fills the cache in the
background and returns positional records per view. When the store cannot be
reached, reads answered entirely from the cache still succeed and are marked
possibly stale; reads that need the store fail with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from infergrid.types.v1 import value_pb2
from libs.errors import DeadlineExceeded, Unavailable
from libs.metrics import LabelCache
from libs.resilience import BreakerPolicy, Dependency, DependencyPolicy, RetryPolicy
from libs.wire import frame
from services.features import codec
from services.features.cache import ABSENT, FeatureCache, cache_key
from services.features.codec import Record
from services.features.config import FeaturesConfig
from services.features.errors import FeatureNotFound, InvalidArgument, ViewNotFound
from services.features.metrics import ENTITY_ROWS, STALE_READS
from services.features.registry import Registry, View
from services.features.store import OnlineStore, WriteRow
from services.features.write_bounds import EventTimeBounds, non_finite, timestamp_us

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 1024
_PLAN_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Plan:
    """Resolved feature references: per output position, the view and the feature's index in it."""

    refs: tuple[str, ...]
    columns: tuple[tuple[View, int], ...]
    views: tuple[View, ...]
    # The response's `feature_names` field, already encoded.
    names_frame: bytes


@dataclass
class ReadResult:
    """Positional records per view and row, ready to encode."""

    plan: Plan
    # view name -> one Record (or None: no values) per entity row
    rows: dict[str, list[Record | None]]
    n_rows: int
    now_us: int
    possibly_stale: bool


@dataclass(frozen=True)
class RowInput:
    """One entity's values to write, as given by a client or an ingestion source."""

    entity_key: Mapping[str, value_pb2.Value]
    values: Mapping[str, value_pb2.Value]
    # None: the time of the write.
    event_us: int | None = None


class OnlineFeatures:
    """Reads and writes feature values through the cache and the store."""

    def __init__(
        self,
        registry: Registry,
        cache: FeatureCache,
        store: OnlineStore,
        config: FeaturesConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.store = store
        self._limits = config.limits
        self._event_bounds = EventTimeBounds(
            min_us=config.limits.min_event_time_s * 1_000_000,
            max_skew_us=int(config.limits.max_event_time_skew_s * 1_000_000),
        )
        self._cache_config = config.cache
        self._prefix = config.cache.cache_key_prefix.encode()
        self._clock = clock
        self._store_timeout_s = config.cassandra.cassandra_request_timeout_s
        self._store_parallelism = max(1, config.cassandra.cassandra_max_in_flight)
        self._cassandra = Dependency(
            "cassandra",
            DependencyPolicy(
                timeout_s=self._store_timeout_s + 0.5,
                retry=RetryPolicy(max_attempts=config.store.store_max_attempts),
                breaker=BreakerPolicy(
                    failure_threshold=config.store.store_breaker_failures,
                    reset_timeout_s=config.store.store_breaker_reset_s,
                ),
            ),
        )
        self.store_ok = True
        self._plans: dict[tuple[str, ...], tuple[int, Plan]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._entity_rows = LabelCache(ENTITY_ROWS)

    # Store access (through the circuit breaker).

    async def _read_store(self, view: View, keys: list[bytes]) -> dict[bytes, Record]:
        try:
            result = await self._cassandra.call(self.store.read, view, keys)
        except (Unavailable, DeadlineExceeded):
            self.store_ok = False
            raise
        self.store_ok = True
        return result

    async def check_store(self) -> bool:
        """Pings the store (bypassing the breaker) and records whether it answered."""
        try:
            await self.store.ping()
        except Exception:
            self.store_ok = False
        else:
            self.store_ok = True
        return self.store_ok

    # Reads.

    async def plan(self, refs: Sequence[str]) -> Plan:
        """Resolves 'view:feature' references (cached per distinct list of references).

        Raises:
            InvalidArgument: A reference is malformed, or there are none or too many.
            ViewNotFound, FeatureNotFound: Names the unknown view or feature.
        """
        key = tuple(refs)
        generation = self.registry.generation
        cached = self._plans.get(key)
        if cached is not None and cached[0] == generation:
            return cached[1]
        if not refs:
            raise InvalidArgument("features: at least one 'view:feature' reference is required")
        if len(refs) > self._limits.max_features_per_request:
            raise InvalidArgument(
                f"features: {len(refs)} references, at most {self._limits.max_features_per_request} are allowed"
            )
        columns: list[tuple[View, int]] = []
        views: dict[str, View] = {}
        for i, ref in enumerate(refs):
            view_name, sep, feature = ref.partition(":")
            if not sep or not view_name or not feature:
                raise InvalidArgument(f"features[{i}]: {ref[:200]!r} is not a 'view:feature' reference")
            view = self.registry.lookup(view_name)
            if view is None:
                # Maybe applied through another replica: look again, at most once a second.
                await self.registry.refresh_if_older(1.0)
                view = self.registry.lookup(view_name)
                if view is None:
                    raise ViewNotFound(view_name[:200])
            index = view.index.get(feature)
            if index is None:
                raise FeatureNotFound(view_name, feature[:200])
            views.setdefault(view_name, view)
            columns.append((view, index))
        names_frame = b"".join(frame(codec.FEATURE_NAMES_TAG, ref.encode()) for ref in key)
        plan = Plan(key, tuple(columns), tuple(views.values()), names_frame)
        if len(self._plans) >= _PLAN_CACHE_SIZE:
            self._plans.clear()
        self._plans[key] = (self.registry.generation, plan)
        return plan

    def _entity_keys(
        self, plan: Plan, entities: Mapping[str, Sequence[value_pb2.Value]]
    ) -> dict[str, list[bytes]]:
        """One entity key per view and row, after checking columns, lengths and types."""
        if not entities:
            raise InvalidArgument("entities: at least one key column with one row is required")
        lengths = {name: len(values) for name, values in entities.items()}
        n = max(lengths.values())
        if n == 0:
            raise InvalidArgument("entities: the key columns have no rows")
        if n > self._limits.max_entities_per_request:
            raise InvalidArgument(
                f"entities: {n} rows, at most {self._limits.max_entities_per_request} are allowed per call"
            )
        if min(lengths.values()) != n:
            raise InvalidArgument(
                f"entities: every key column must have the same number of rows, got {lengths}"
            )
        needed = {column for view in plan.views for column in view.key_column_names}
        for column in entities:
            if column not in needed:
                described = "; ".join(f"{v.name}: {', '.join(v.key_column_names)}" for v in plan.views)
                raise InvalidArgument(
                    f"entities: {column[:200]!r} is not a key column of any requested view ({described})"
                )
        parts_cache: dict[tuple[str, int], list[bytes]] = {}
        keys: dict[str, list[bytes]] = {}
        for view in plan.views:
            per_column: list[list[bytes]] = []
            for column, value_type in view.key_columns:
                values = entities.get(column)
                if values is None:
                    raise InvalidArgument(f"entities: key column {column!r} of view {view.name!r} is missing")
                parts = parts_cache.get((column, value_type))
                if parts is None:
                    parts = parts_cache[(column, value_type)] = _key_parts(column, value_type, values)
                per_column.append(parts)
            if len(per_column) == 1:
                keys[view.name] = per_column[0]
            else:
                keys[view.name] = [codec.join_key(p) for p in zip(*per_column, strict=True)]
        return keys

    async def read(
        self, refs: Sequence[str], entities: Mapping[str, Sequence[value_pb2.Value]]
    ) -> ReadResult:
        """The latest values of `refs` for every entity row.

        Raises:
            InvalidArgument, ViewNotFound, FeatureNotFound: The request is wrong (named in the message).
            Unavailable: Some values are not cached and the store cannot be reached.
        """
        plan = await self.plan(refs)
        keys_by_view = self._entity_keys(plan, entities)
        n_rows = len(next(iter(keys_by_view.values())))
        now_us = int(self._clock() * 1_000_000)

        # One MGET for the distinct entities of every view.
        unique: list[tuple[View, list[bytes]]] = []
        redis_keys: list[bytes] = []
        for view in plan.views:
            distinct = list(dict.fromkeys(keys_by_view[view.name]))
            unique.append((view, distinct))
            self._entity_rows(view.name).inc(n_rows)
            prefix = self._prefix + view.name.encode() + b":"
            redis_keys.extend(prefix + k for k in distinct)
        entries = await self.cache.get_many(redis_keys)

        found: dict[str, dict[bytes, Record | None]] = {}
        misses: list[tuple[View, list[bytes]]] = []
        position = 0
        for view, distinct in unique:
            got: dict[bytes, Record | None] = {}
            missed: list[bytes] = []
            for key in distinct:
                entry = entries[position]
                position += 1
                if entry is None:
                    missed.append(key)
                elif entry is ABSENT:
                    got[key] = None
                else:
                    got[key] = entry  # type: ignore[assignment]
            found[view.name] = got
            if missed:
                misses.append((view, missed))

        possibly_stale = False
        if misses:
            results = await asyncio.gather(*(self._read_store(view, keys) for view, keys in misses))
            fills: list[tuple[bytes, Record | None]] = []
            ttls: list[float] = []
            for (view, keys), records in zip(misses, results, strict=True):
                got = found[view.name]
                ttl, negative_ttl = self._cache_ttls(view)
                for key in keys:
                    record = records.get(key)
                    got[key] = record
                    fills.append((cache_key(self._prefix, view.name, key), record))
                    ttls.append(ttl if record is not None else negative_ttl)
            if self.cache.enabled:
                self._spawn(self.cache.put_many(fills, ttls))
        elif not self.store_ok:
            possibly_stale = True
            STALE_READS.inc()

        rows = {view.name: [found[view.name][k] for k in keys_by_view[view.name]] for view in plan.views}
        return ReadResult(plan, rows, n_rows, now_us, possibly_stale)

    def _cache_ttls(self, view: View) -> tuple[float, float]:
        ttl = self._cache_config.cache_ttl_s
        if view.ttl_us:
            ttl = min(ttl, max(1.0, view.ttl_us / 1e6))
        return ttl, min(ttl, self._cache_config.cache_negative_ttl_s)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Waits for background cache fills (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # Writes.

    def prepare(self, view_name: str, rows: Sequence[Any]) -> tuple[View, list[WriteRow]]:
        """The view called `view_name`, and the `FeatureRow`s of a WriteFeaturesRequest (over gRPC or from
        the stream) checked and encoded for it by `prepare_rows`.

        Raises:
            ViewNotFound: There is no such view.
        """
        inputs = [
            RowInput(
                row.entity_key,
                row.values,
                timestamp_us(f"rows[{i}].event_timestamp", row.event_timestamp)
                if row.HasField("event_timestamp")
                else None,
            )
            for i, row in enumerate(rows)
        ]
        view = self.registry.get(view_name)
        return view, self.prepare_rows(view, inputs)

    def prepare_rows(self, view: View, rows: Sequence[RowInput]) -> list[WriteRow]:
        """Checks rows against the view and encodes them for the store.

        Nothing is written unless every row is good: the first bad row refuses the batch,
        named by its index (`rows[2].event_timestamp`, `rows[0].values['amount']`).

        Raises:
            InvalidArgument: A row is malformed (named by index, column and problem): a wrong type,
                an event time out of bounds (see write_bounds), NaN or ±Inf in a feature that does
                not allow them.
            FeatureNotFound: A value names a feature the view does not have.
        """
        if not rows:
            raise InvalidArgument("rows: at least one row is required")
        if len(rows) > self._limits.max_rows_per_write:
            raise InvalidArgument(
                f"rows: {len(rows)} rows, at most {self._limits.max_rows_per_write} are allowed per call"
            )
        now_us = int(self._clock() * 1_000_000)
        out: list[WriteRow] = []
        key_names = set(view.key_column_names)
        for i, row in enumerate(rows):
            for column in row.entity_key:
                if column not in key_names:
                    raise InvalidArgument(
                        f"rows[{i}].entity_key: {column[:200]!r} is not a key column of view {view.name!r} "
                        f"({', '.join(view.key_column_names)})"
                    )
            parts: list[bytes] = []
            for column, value_type in view.key_columns:
                value = row.entity_key.get(column)
                if value is None:
                    raise InvalidArgument(f"rows[{i}].entity_key: key column {column!r} is missing")
                part = codec.key_part(value, value_type)
                if part is None:
                    raise InvalidArgument(
                        f"rows[{i}].entity_key[{column!r}]: expected {codec.type_name(value_type)}, "
                        f"got {codec.kind_name(value)}"
                    )
                _check_key_size(f"rows[{i}].entity_key[{column!r}]", part)
                parts.append(part)
            if not row.values:
                raise InvalidArgument(f"rows[{i}].values: at least one feature value is required")
            if row.event_us is None:
                event_us = now_us
            else:
                event_us = row.event_us
                self._event_bounds.check(f"rows[{i}].event_timestamp", event_us, now_us)
            cells: dict[str, bytes] = {}
            for name, value in row.values.items():
                index = view.index.get(name)
                if index is None:
                    raise FeatureNotFound(view.name, name[:200])
                expected = view.feature_types[index]
                if value.WhichOneof("kind") != codec.ONEOF_BY_TYPE[expected]:
                    raise InvalidArgument(
                        f"rows[{i}].values[{name!r}]: expected {codec.type_name(expected)}, "
                        f"got {codec.kind_name(value)}"
                    )
                if view.finite_only[index]:
                    where = non_finite(value)
                    if where is not None:
                        raise InvalidArgument(
                            f"rows[{i}].values[{name!r}]{where}: NaN and infinities are refused (feature "
                            f"{name!r} of view {view.name!r} does not set allow_non_finite)"
                        )
                cells[name] = codec.cell(event_us, value.SerializeToString())
            out.append(WriteRow(codec.join_key(parts), cells, event_us))
        return out

    async def write(self, view: View, rows: Sequence[WriteRow], *, timeout_s: float | None = None) -> None:
        """Writes encoded rows to the store, then drops their cache entries.

        Args:
            view: The view the rows belong to.
            rows: Encoded rows (see `prepare_rows`).
            timeout_s: For the whole call. By default one request timeout per wave of
                `store_parallelism` rows (the rows are written that many at a time).

        Raises:
            Unavailable: The store cannot be reached (nothing is acknowledged).
        """
        if timeout_s is None:
            waves = -(-len(rows) // self._store_parallelism)
            timeout_s = self._store_timeout_s * max(1, waves) + 0.5
        try:
            await self._cassandra.call(self.store.write, view, rows, timeout=timeout_s)
        except (Unavailable, DeadlineExceeded):
            self.store_ok = False
            raise
        self.store_ok = True
        await self.cache.invalidate(list({cache_key(self._prefix, view.name, r.key): None for r in rows}))


def _check_key_size(where: str, part: bytes) -> None:
    if len(part) > MAX_KEY_BYTES:
        raise InvalidArgument(f"{where}: the key is {len(part)} bytes, at most {MAX_KEY_BYTES} are allowed")


def _key_parts(column: str, value_type: int, values: Sequence[value_pb2.Value]) -> list[bytes]:
    """The key bytes of one column for every row, checking types (the hot path: keep it lean)."""
    if value_type == codec.VT.VALUE_TYPE_STRING:
        try:
            parts = [v.string_value.encode() for v in values if v.WhichOneof("kind") == "string_value"]
        except UnicodeEncodeError:
            parts = []
    else:
        parts = [p for p in (codec.key_part(v, value_type) for v in values) if p is not None]
    if len(parts) != len(values):
        for i, v in enumerate(values):
            if codec.key_part(v, value_type) is None:
                if value_type == codec.VT.VALUE_TYPE_INT64 and v.WhichOneof("kind") == "string_value":
                    raise InvalidArgument(
                        f"entities.{column}: expected an integer, got {v.string_value[:100]!r} (row {i}; "
                        "the view's key column is INT64)"
                    )
                raise InvalidArgument(
                    f"entities[{column!r}][{i}]: expected {codec.type_name(value_type)}, got {codec.kind_name(v)}"
                )
    if parts and max(map(len, parts)) > MAX_KEY_BYTES:
        for i, part in enumerate(parts):
            _check_key_size(f"entities[{column!r}][{i}]", part)
    return parts
