"""Where entity features come from: the FeatureSource role and its gRPC FeatureService implementation."""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import numpy as np

from infergrid.features.v1 import features_pb2, features_pb2_grpc
from libs.resilience import Dependency
from services.gateway.catalog import ModelSpec

log = logging.getLogger(__name__)

_PRESENT = features_pb2.FEATURE_STATUS_PRESENT
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
    """FeatureService.GetOnlineFeatures through one channel, behind the dependency's breaker."""

    def __init__(self, channel: grpc.aio.Channel, dependency: Dependency) -> None:
        self._stub = features_pb2_grpc.FeatureServiceStub(channel)
        self._dependency = dependency
        self._unreadable: set[str] = set()

    async def _get(
        self, request: features_pb2.GetOnlineFeaturesRequest, timeout: float
    ) -> features_pb2.GetOnlineFeaturesResponse:
        return await self._stub.GetOnlineFeatures(request, timeout=timeout)

    async def fetch(
        self, spec: ModelSpec, entities: Sequence[Mapping[str, str]], timeout: float
    ) -> FeatureValues:
        request = features_pb2.GetOnlineFeaturesRequest(features=spec.store_refs)
        for key in spec.entity_keys:
            column = request.entities[key].values
            for row in entities:
                column.add(string_value=row[key])
        reply = await self._dependency.call(self._get, request, timeout, timeout=timeout)
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
