"""The registry of feature views: validation, compatible evolution, and an in-memory copy for reads.

Views are stored through a `ViewStore` (Cassandra in production) and kept in
memory, re-read periodically so that changes applied through another replica
become visible. A view may gain features and change its TTL, description, owner
and tags; changing the entity key or a feature's type, or removing a feature,
would change what stored values mean and is refused.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from infergrid.features.v1 import features_pb2
from services.features import codec
from services.features.errors import IncompatibleChange, InvalidArgument, ViewNotFound
from services.features.write_bounds import non_finite

log = logging.getLogger(__name__)

FeatureView = features_pb2.FeatureView
T = TypeVar("T", features_pb2.EntityKeyColumn, features_pb2.FeatureSpec)

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_FEATURES_PER_VIEW = 4096
MAX_KEY_COLUMNS = 8
_FLOATING = frozenset(
    {
        codec.VT.VALUE_TYPE_FLOAT,
        codec.VT.VALUE_TYPE_DOUBLE,
        codec.VT.VALUE_TYPE_FLOAT_LIST,
        codec.VT.VALUE_TYPE_DOUBLE_LIST,
    }
)


class ViewStore(Protocol):
    """Where feature views are kept."""

    async def load_all(self) -> list[FeatureView]:
        """Every stored view."""
        ...

    async def create(self, view: FeatureView) -> bool:
        """Stores a new view; False when one of that name already exists."""
        ...

    async def update(self, view: FeatureView, expected_revision: int) -> bool:
        """Replaces a view if its stored revision is still `expected_revision`; False otherwise."""
        ...


@dataclass(frozen=True)
class View:
    """A feature view compiled for the read and write paths."""

    spec: FeatureView
    name: str
    key_columns: tuple[tuple[str, int], ...]
    feature_names: tuple[str, ...]
    feature_types: tuple[int, ...]
    # Per feature: whether writes must be finite (a FLOAT or DOUBLE type without `allow_non_finite`).
    finite_only: tuple[bool, ...]
    index: dict[str, int]
    # 0: values never expire.
    ttl_us: int
    revision: int

    @classmethod
    def compile(cls, spec: FeatureView) -> View:
        """The read/write form of a stored view."""
        return cls(
            spec=spec,
            name=spec.name,
            key_columns=tuple((c.name, int(c.type)) for c in spec.entity.key_columns),
            feature_names=tuple(f.name for f in spec.features),
            feature_types=tuple(int(f.type) for f in spec.features),
            finite_only=tuple(f.type in _FLOATING and not f.allow_non_finite for f in spec.features),
            index={f.name: i for i, f in enumerate(spec.features)},
            ttl_us=spec.ttl.seconds * 1_000_000 + spec.ttl.nanos // 1000,
            revision=spec.revision,
        )

    @property
    def key_column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.key_columns)


def _check_name(what: str, name: str) -> None:
    if not NAME.match(name):
        raise InvalidArgument(
            f"{what} {name!r} is not a valid name (letters, digits and '_', starting with a letter or '_', "
            "at most 128 characters)"
        )


def _named(field: str, noun: str, items: Sequence[T], maximum: int) -> Iterator[T]:
    """The items, each checked for a valid name given once; at least one and at most `maximum` of them."""
    if not items:
        raise InvalidArgument(f"{field}: at least one {noun} is required")
    if len(items) > maximum:
        raise InvalidArgument(f"{field}: at most {maximum} are allowed")
    seen: set[str] = set()
    for item in items:
        _check_name(f"{field}.name", item.name)
        if item.name in seen:
            raise InvalidArgument(f"{field}: {item.name!r} is given twice")
        seen.add(item.name)
        yield item


def validate(spec: FeatureView) -> None:
    """Checks a view as given by a client.

    Raises:
        InvalidArgument: Names the field and what is wrong with it.
    """
    _check_name("feature_view.name", spec.name)
    _check_name("feature_view.entity.name", spec.entity.name)
    for column in _named(
        "feature_view.entity.key_columns", "key column", spec.entity.key_columns, MAX_KEY_COLUMNS
    ):
        if column.type not in codec.KEY_TYPES:
            raise InvalidArgument(
                f"feature_view.entity.key_columns: {column.name!r} has type {codec.type_name(column.type)}; "
                "a key column must be STRING, INT64 or BYTES"
            )
    for feature in _named("feature_view.features", "feature", spec.features, MAX_FEATURES_PER_VIEW):
        if feature.type not in codec.ONEOF_BY_TYPE:
            raise InvalidArgument(
                f"feature_view.features: {feature.name!r} has no valid type ({codec.type_name(feature.type)})"
            )
        if feature.HasField("default_value") and feature.default_value.WhichOneof(
            "kind"
        ) != codec.ONEOF_BY_TYPE.get(feature.type):
            raise InvalidArgument(
                f"feature_view.features: the default value of {feature.name!r} is "
                f"{codec.kind_name(feature.default_value)}, not {codec.type_name(feature.type)}"
            )
        if not feature.allow_non_finite and feature.HasField("default_value"):
            where = non_finite(feature.default_value)
            if where is not None:
                raise InvalidArgument(
                    f"feature_view.features: the default value{where} of {feature.name!r} is NaN or infinite "
                    "(set allow_non_finite on the feature to allow it)"
                )
    if spec.ttl.seconds < 0 or spec.ttl.nanos < 0:
        raise InvalidArgument("feature_view.ttl must not be negative")


def _describe_key(columns: Sequence[features_pb2.EntityKeyColumn]) -> str:
    return ", ".join(f"{c.name} {codec.type_name(c.type)}" for c in columns) or "none"


def evolve(current: FeatureView, requested: FeatureView) -> FeatureView:
    """The view that results from applying `requested` over `current`.

    Existing features keep their order and position; new ones are appended.

    Raises:
        IncompatibleChange: The entity key or a feature's type would change, or a feature would be removed.
    """
    old_key = [(c.name, c.type) for c in current.entity.key_columns]
    new_key = [(c.name, c.type) for c in requested.entity.key_columns]
    if current.entity.name != requested.entity.name or old_key != new_key:
        raise IncompatibleChange(
            f"feature view {current.name!r}: the entity key cannot change (it is {current.entity.name}"
            f"({_describe_key(current.entity.key_columns)}), the request has {requested.entity.name}"
            f"({_describe_key(requested.entity.key_columns)})); create a new view instead"
        )
    wanted = {f.name: f for f in requested.features}
    merged = FeatureView()
    merged.CopyFrom(requested)
    del merged.features[:]
    for feature in current.features:
        new = wanted.pop(feature.name, None)
        if new is None:
            raise IncompatibleChange(
                f"feature view {current.name!r}: feature {feature.name!r} cannot be removed "
                "(stored values refer to it); keep it in the view"
            )
        if new.type != feature.type:
            raise IncompatibleChange(
                f"feature view {current.name!r}: feature {feature.name!r} is {codec.type_name(feature.type)} "
                f"and cannot become {codec.type_name(new.type)}; add a feature with a new name instead"
            )
        merged.features.append(new)
    merged.features.extend(f for f in requested.features if f.name in wanted)
    merged.created_time.CopyFrom(current.created_time)
    merged.revision = current.revision
    return merged


def _same_definition(a: FeatureView, b: FeatureView) -> bool:
    def strip(v: FeatureView) -> bytes:
        copy = FeatureView()
        copy.CopyFrom(v)
        copy.ClearField("created_time")
        copy.ClearField("updated_time")
        copy.ClearField("revision")
        return copy.SerializeToString(deterministic=True)

    return strip(a) == strip(b)


class Registry:
    """Feature views, validated on apply and served from memory."""

    def __init__(self, store: ViewStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._views: dict[str, View] = {}
        self._lock = asyncio.Lock()
        self._last_refresh = 0.0
        # Bumped whenever the in-memory views are replaced (callers cache what they derive from them).
        self.generation = 0

    async def refresh(self) -> None:
        """Re-reads every view from the store."""
        specs = await self._store.load_all()
        views = {spec.name: View.compile(spec) for spec in specs}
        if {n: v.spec for n, v in views.items()} != {n: v.spec for n, v in self._views.items()}:
            self._views = views
            self.generation += 1
        self._last_refresh = time.monotonic()

    async def refresh_if_older(self, seconds: float) -> None:
        """Re-reads the views unless that was done less than `seconds` ago."""
        if time.monotonic() - self._last_refresh >= seconds:
            await self.refresh()

    def lookup(self, name: str) -> View | None:
        """The view called `name`, or None."""
        return self._views.get(name)

    def get(self, name: str) -> View:
        """The view called `name`.

        Raises:
            ViewNotFound: There is none.
        """
        view = self._views.get(name)
        if view is None:
            raise ViewNotFound(name)
        return view

    def views(self) -> list[View]:
        """All views, by name."""
        return [self._views[name] for name in sorted(self._views)]

    async def apply(self, requested: FeatureView) -> tuple[View, bool]:
        """Creates or evolves a view.

        Returns:
            The view as stored, and whether it was created.

        Raises:
            InvalidArgument: The view is malformed.
            IncompatibleChange: The change would alter the meaning of stored values.
        """
        validate(requested)
        async with self._lock:
            for _ in range(5):
                await self.refresh()
                current = self._views.get(requested.name)
                now = self._clock()
                if current is None:
                    spec = FeatureView()
                    spec.CopyFrom(requested)
                    spec.created_time.FromNanoseconds(int(now * 1e9))
                    spec.updated_time.FromNanoseconds(int(now * 1e9))
                    spec.revision = 1
                    if await self._store.create(spec):
                        log.info("feature view %s created", spec.name)
                        return self._install(spec), True
                    continue
                spec = evolve(current.spec, requested)
                if _same_definition(spec, current.spec):
                    return current, False
                spec.updated_time.FromNanoseconds(int(now * 1e9))
                spec.revision = current.revision + 1
                if await self._store.update(spec, current.revision):
                    log.info("feature view %s updated to revision %d", spec.name, spec.revision)
                    return self._install(spec), False
        raise IncompatibleChange(
            f"feature view {requested.name!r} is being changed concurrently; apply it again"
        )

    def _install(self, spec: FeatureView) -> View:
        """Serves a view just stored."""
        view = self._views[spec.name] = View.compile(spec)
        self.generation += 1
        return view
