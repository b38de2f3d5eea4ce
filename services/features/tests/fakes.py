"""Small in-memory fakes of the features domain interfaces (OnlineStore, ViewStore, FeatureCache)."""

from __future__ import annotations

from collections.abc import Sequence

from infergrid.features.v1 import features_pb2
from services.features import codec
from services.features.cache import ABSENT, CacheEntry
from services.features.codec import Record
from services.features.errors import StoreUnavailable
from services.features.registry import View
from services.features.store import WriteRow


class InMemoryOnlineStore:
    """Latest cell per feature, newest event time wins; `down = True` makes every call UNAVAILABLE."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, bytes], dict[str, bytes]] = {}
        self.down = False
        self.reads = 0

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("in-memory store is down")

    async def read(self, view: View, keys: Sequence[bytes]) -> dict[bytes, Record]:
        self._check()
        self.reads += 1
        out = {}
        for key in keys:
            cells = self.rows.get((view.name, key))
            if cells:
                out[key] = Record.from_cells(view.feature_names, cells)
        return out

    async def write(self, view: View, rows: Sequence[WriteRow]) -> None:
        self._check()
        for row in rows:
            stored = self.rows.setdefault((view.name, row.key), {})
            for name, cell in row.cells.items():
                old = stored.get(name)
                # Last write wins by event time, as in Cassandra: a cell starts with its event time (µs).
                if old is None or int.from_bytes(old[:8], "big", signed=True) <= row.event_us:
                    stored[name] = cell

    async def ping(self) -> None:
        self._check()


class InMemoryViewStore:
    def __init__(self) -> None:
        self.views: dict[str, bytes] = {}

    async def load_all(self) -> list[features_pb2.FeatureView]:
        return [features_pb2.FeatureView.FromString(b) for b in self.views.values()]

    async def create(self, view: features_pb2.FeatureView) -> bool:
        if view.name in self.views:
            return False
        self.views[view.name] = view.SerializeToString()
        return True

    async def update(self, view: features_pb2.FeatureView, expected_revision: int) -> bool:
        current = features_pb2.FeatureView.FromString(self.views[view.name])
        if current.revision != expected_revision:
            return False
        self.views[view.name] = view.SerializeToString()
        return True


class InMemoryCache:
    """Stores encoded payloads, like Redis would (TTLs are recorded, not enforced)."""

    enabled = True

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.ttls: dict[bytes, float] = {}

    async def get_many(self, keys: Sequence[bytes]) -> list[CacheEntry]:
        out: list[CacheEntry] = []
        for key in keys:
            payload = self.data.get(key)
            if payload is None:
                out.append(None)
            else:
                record = codec.decode_record(payload)
                out.append(ABSENT if record is None else record)
        return out

    async def put_many(self, items: Sequence[tuple[bytes, Record | None]], ttls_s: Sequence[float]) -> None:
        for (key, record), ttl in zip(items, ttls_s, strict=True):
            self.data[key] = codec.encode_record(record)
            self.ttls[key] = ttl

    async def invalidate(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            self.data.pop(key, None)
