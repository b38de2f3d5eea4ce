"""Where entity features come from: the FeatureSource role and its gRPC FeatureService implementation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from infergrid.features.v1 import features_pb2, features_pb2_grpc
from infergrid.types.v1 import value_pb2
from libs.errors import InvalidArgument
from libs.pool import ChannelPool, Endpoint
from libs.resilience import Dependency
from services.gateway.catalog import ModelSpec

log = logging.getLogger(__name__)

_PRESENT = features_pb2.FEATURE_STATUS_PRESENT
_STRING = value_pb2.VALUE_TYPE_STRING
_INT64 = value_pb2.VALUE_TYPE_INT64
_BYTES = value_pb2.VALUE_TYPE_BYTES
# How long key types read from the registry are trusted, and how soon a failed read is retried.
_KEY_TYPES_TTL_S = 60.0
_KEY_TYPES_RETRY_S = 5.0
_NUMERIC_KINDS = {
    kind: operator.attrgetter(kind) for kind in ("float_value", "double_value", "int64_value", "bool_value")
}


@dataclass(slots=True)
class FeatureValues:
    """Values of a model's store features for a batch of rows, in `ModelSpec.store_refs` order."""

    # float32 [rows, refs]; entries where `present` is False are meaningless.
    values: np.ndarray
    # bool [rows, refs]: True when the value is present and within its view's TTL.
    present: np.ndarray


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

    Entity keys arrive as strings; each is sent as the type its view declares (STRING, INT64 or
    BYTES), read once from the registry (GetFeatureView) and refreshed every minute. While the
    registry cannot be read, keys go as strings.
    """

    def __init__(self, pool: ChannelPool, dependency: Dependency) -> None:
        self._pool = pool
        self._dependency = dependency
        self._unreadable: set[str] = set()
        # model name -> (key column types, when to look again)
        self._key_types: dict[str, tuple[dict[str, int], float]] = {}
        self._looking: dict[str, asyncio.Task[None]] = {}

    async def _get(
        self, request: features_pb2.GetOnlineFeaturesRequest, deadline: float
    ) -> features_pb2.GetOnlineFeaturesResponse:
        async def _on(endpoint: Endpoint) -> features_pb2.GetOnlineFeaturesResponse:
            stub = endpoint.stub(features_pb2_grpc.FeatureServiceStub)
            return await stub.GetOnlineFeatures(request, timeout=max(0.001, deadline - time.monotonic()))

        return await self._pool.call(_on)

    async def close(self) -> None:
        """Closes the pool's channels."""
        await self._pool.close()

    def key_types(self, spec: ModelSpec) -> dict[str, int]:
        """The key column types of the model's views as last read (starts a refresh when due)."""
        known = self._key_types.get(spec.name)
        if (known is None or time.monotonic() >= known[1]) and spec.name not in self._looking:
            task = asyncio.get_running_loop().create_task(self._read_key_types(spec))
            self._looking[spec.name] = task
            task.add_done_callback(lambda _t: self._looking.pop(spec.name, None))
        return known[0] if known is not None else {}

    async def _read_key_types(self, spec: ModelSpec) -> None:
        types: dict[str, int] = {}
        try:
            views = {ref.split(":", 1)[0] for ref in spec.store_refs}
            for view in sorted(views):
                request = features_pb2.GetFeatureViewRequest(name=view)

                async def _on(
                    endpoint: Endpoint, request: features_pb2.GetFeatureViewRequest = request
                ) -> features_pb2.FeatureView:
                    stub = endpoint.stub(features_pb2_grpc.FeatureServiceStub)
                    return await stub.GetFeatureView(request, timeout=1.0)

                reply = await self._pool.call(_on)
                for column in reply.entity.key_columns:
                    types[column.name] = int(column.type)
        except Exception as exc:  # the registry is optional for reads: keys go as strings meanwhile
            log.warning(
                "reading the key types of model %s failed (%s); keys are sent as strings", spec.name, exc
            )
            previous = self._key_types.get(spec.name, ({}, 0.0))[0]
            self._key_types[spec.name] = (previous, time.monotonic() + _KEY_TYPES_RETRY_S)
            return
        self._key_types[spec.name] = (types, time.monotonic() + _KEY_TYPES_TTL_S)

    async def fetch(
        self, spec: ModelSpec, entities: Sequence[Mapping[str, str]], timeout: float
    ) -> FeatureValues:
        if spec.name not in self._key_types:
            task = self._looking.get(spec.name)
            if task is None:
                self.key_types(spec)
                task = self._looking.get(spec.name)
            if task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(task), timeout)
        types = self.key_types(spec)
        request = features_pb2.GetOnlineFeaturesRequest(features=spec.store_refs)
        for key in spec.entity_keys:
            column = request.entities[key].values
            kind = types.get(key, _STRING)
            if kind == _INT64:
                for row in entities:
                    try:
                        column.add(int64_value=int(row[key]))
                    except ValueError:
                        raise InvalidArgument(
                            f"entities.{key}: expected an integer, got {row[key][:100]!r}"
                        ) from None
            elif kind == _BYTES:
                for row in entities:
                    column.add(bytes_value=row[key].encode())
            else:
                for row in entities:
                    column.add(string_value=row[key])
        deadline = time.monotonic() + timeout
        reply = await self._dependency.call(self._get, request, deadline, timeout=timeout)
        return self._decode(spec, reply, len(entities))

    def _decode(
        self, spec: ModelSpec, reply: features_pb2.GetOnlineFeaturesResponse, n: int
    ) -> FeatureValues:
        width = len(spec.store_refs)
        values = np.zeros((n, width), dtype=np.float32)
        present = np.zeros((n, width), dtype=bool)
        positions = {name: j for j, name in enumerate(spec.store_refs)}
        for name, vector in zip(reply.feature_names, reply.results, strict=False):
            j = positions.get(name)
            if j is None or len(vector.values) != n:
                continue
            mask = np.asarray(vector.statuses, dtype=np.int32) == _PRESENT
            if len(mask) != n or not mask.any():
                continue
            first = vector.values[int(np.argmax(mask))].WhichOneof("kind")
            getter = _NUMERIC_KINDS.get(first or "")
            if getter is None:
                if name not in self._unreadable:
                    self._unreadable.add(name)
                    log.warning("feature %s has non-numeric values (%s); its default is used", name, first)
                continue
            values[:, j] = list(map(getter, vector.values))
            present[:, j] = mask
        return FeatureValues(values, present)
