"""Where entity features come from: the FeatureSource role and its gRPC FeatureService implementation."""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Protocol

import numpy as np
from opentelemetry import propagate

from infergrid.features.v1 import features_pb2, features_pb2_grpc
from libs.pool import ChannelPool, Endpoint
from libs.resilience import Dependency
from services.gateway.catalog import ModelSpec

log = logging.getLogger(__name__)

_PRESENT = features_pb2.FEATURE_STATUS_PRESENT
_GET_ONLINE_FEATURES = "infergrid.features.v1.FeatureService/GetOnlineFeatures"
_NUMERIC_KINDS = {
    kind: operator.attrgetter(kind) for kind in ("float_value", "double_value", "int64_value", "bool_value")
}
_SECONDS = operator.attrgetter("seconds")
_NANOS = operator.attrgetter("nanos")


@dataclass(slots=True)
class FeatureValues:
    """Values of a model's store features for a batch of rows, in `ModelSpec.store_refs` order."""

    # float32 [rows, refs]; entries where `present` is False are meaningless.
    values: np.ndarray
    # bool [rows, refs]: True when the value is present and within its view's TTL.
    present: np.ndarray
    # int64 [rows, refs]: the event time of each present value, microseconds since the epoch (0 where
    # not present or not known); None when the source does not know event times.
    event_us: np.ndarray | None = None


def zeros(n: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`FeatureValues`' arrays for `n` rows of `width` refs, nothing present."""
    values = np.zeros((n, width), dtype=np.float32)
    return values, np.zeros(values.shape, dtype=bool), np.zeros(values.shape, dtype=np.int64)


class FeatureSource(Protocol):
    """Reads the latest feature values of many entity rows in one call."""

    async def fetch(
        self, spec: ModelSpec, entities: Sequence[Mapping[str, str]], timeout: float
    ) -> FeatureValues:
        """The values of `spec.store_refs` for each row of entity keys.

        Raises:
            Exception: The source failed; client errors (INVALID_ARGUMENT) blame the rows.
        """
        ...


class GrpcFeatureSource:
    """FeatureService.GetOnlineFeatures round robin over the pool's endpoints, behind the dependency's breaker.

    A call that fails UNAVAILABLE on one endpoint is retried on another (the pool's failover).

    Entity keys go as strings: the feature service converts each to the type its view declares. Each
    call carries the current trace context (`traceparent`) in its metadata.
    """

    def __init__(self, pool: ChannelPool, dependency: Dependency) -> None:
        self._pool = pool
        self._dependency = dependency
        self._unreadable: set[str] = set()

    async def _get(
        self, request: features_pb2.GetOnlineFeaturesRequest, deadline: float
    ) -> features_pb2.GetOnlineFeaturesResponse:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # the batch's trace context (sampled or not); nothing with tracing off
        metadata = tuple(carrier.items()) or None

        async def _on(endpoint: Endpoint) -> features_pb2.GetOnlineFeaturesResponse:
            stub = endpoint.stub(features_pb2_grpc.FeatureServiceStub)
            return await stub.GetOnlineFeatures(
                request, timeout=max(0.001, deadline - time.monotonic()), metadata=metadata
            )

        return await self._pool.call(_on, _GET_ONLINE_FEATURES)

    async def close(self) -> None:
        """Closes the pool's channels."""
        await self._pool.close()

    async def fetch(
        self, spec: ModelSpec, entities: Sequence[Mapping[str, str]], timeout: float
    ) -> FeatureValues:
        request = features_pb2.GetOnlineFeaturesRequest(features=spec.store_refs)
        for key in spec.entity_keys:
            column = request.entities[key].values
            for row in entities:
                column.add(string_value=row[key])
        deadline = time.monotonic() + timeout
        reply = await self._dependency.call(self._get, request, deadline, timeout=timeout)
        return self._decode(spec, reply, len(entities))

    def _decode(
        self, spec: ModelSpec, reply: features_pb2.GetOnlineFeaturesResponse, n: int
    ) -> FeatureValues:
        """The reply's columns gathered into flat lists, then turned into arrays once per batch (numpy
        calls per column cost more than the values: 24 columns, a few rows)."""
        values, present, event_us = zeros(n, len(spec.store_refs))
        positions = {name: j for j, name in enumerate(spec.store_refs)}
        columns: list[int] = []
        numbers: list[float] = []
        statuses: list[int] = []
        seconds: list[int] = []
        nanos: list[int] = []
        for name, vector in zip(reply.feature_names, reply.results, strict=False):
            j = positions.get(name)
            column_statuses = list(vector.statuses)
            if j is None or len(vector.values) != n or len(column_statuses) != n:
                continue
            try:
                first = vector.values[column_statuses.index(_PRESENT)].WhichOneof("kind")
            except ValueError:  # nothing present
                continue
            getter = _NUMERIC_KINDS.get(first or "")
            if getter is None:
                if name not in self._unreadable:
                    self._unreadable.add(name)
                    log.warning("feature %s has non-numeric values (%s); its default is used", name, first)
                continue
            columns.append(j)
            numbers.extend(map(getter, vector.values))
            statuses.extend(column_statuses)
            stamps = vector.event_timestamps
            if len(stamps) == n:
                seconds.extend(map(_SECONDS, stamps))
                nanos.extend(map(_NANOS, stamps))
            else:
                seconds.extend(repeat(0, n))
                nanos.extend(repeat(0, n))
        if columns:
            shape = (len(columns), n)
            mask = (np.array(statuses, dtype=np.int32) == _PRESENT).reshape(shape).T
            values[:, columns] = np.array(numbers, dtype=np.float32).reshape(shape).T
            present[:, columns] = mask
            micros = np.array(seconds, dtype=np.int64) * 1_000_000 + np.array(nanos, dtype=np.int64) // 1000
            event_us[:, columns] = np.where(mask, micros.reshape(shape).T, 0)
        return FeatureValues(values, present, event_us)
