"""Small in-memory fakes of the gateway's roles (FeatureSource, ModelClient, RecordPublisher) and a test model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
import numpy as np

from inference import grpc_service_pb2 as ipb
from inference import model_config_pb2
from infergrid.logging.v1 import logging_pb2
from services.gateway.catalog import ModelSpec, parse_spec
from services.gateway.features import FeatureValues, zeros

# A 5-input model: 2 request-time features, 2 user features and 1 merchant feature.
DESCRIPTION = {
    "model": "toy",
    "input": "features",
    "output": "score",
    "entities": {"user": "user_id", "merchant": "merchant_id"},
    "features": [
        {"name": "amount", "source": "request", "default": 1.0},
        {"name": "user:age", "source": "user", "default": 30.0},
        {"name": "hour", "source": "request", "default": 12.0},
        {"name": "user:count", "source": "user", "default": 2.0},
        {"name": "merchant:risk", "source": "merchant", "default": 0.5},
    ],
}
WEIGHTS = np.asarray([1.0, 10.0, 100.0, 1000.0, 10000.0], dtype=np.float32)


def toy_spec(versions: tuple[str, ...] = ("1", "2")) -> ModelSpec:
    return parse_spec("toy", DESCRIPTION, versions)


class FakeFeatures:
    """Feature values (and their event times in µs, default 0: unknown) by (view, entity id); records batch sizes."""

    def __init__(
        self,
        values: Mapping[tuple[str, str], Mapping[str, float]] | None = None,
        event_us: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        self.values = dict(values or {})
        self.event_us = dict(event_us or {})
        self.calls: list[int] = []
        self.failure: Exception | None = None
        self.delay_s = 0.0

    async def fetch(
        self, spec: ModelSpec, entities: Sequence[Mapping[str, str]], timeout: float
    ) -> FeatureValues:
        self.calls.append(len(entities))
        if self.delay_s:  # a real source's call deadline is `timeout`
            await asyncio.sleep(min(self.delay_s, timeout))
            if self.delay_s > timeout:
                raise TimeoutError("features did not answer in time")
        if self.failure is not None:
            raise self.failure
        values, present, event_us = zeros(len(entities), len(spec.store_refs))
        for i, row in enumerate(entities):
            for j, ref in enumerate(spec.store_refs):
                view, feature = ref.split(":", 1)
                key = (view, row[spec.view_keys[view]])
                stored = self.values.get(key, {})
                if feature in stored:
                    values[i, j] = stored[feature]
                    present[i, j] = True
                    event_us[i, j] = self.event_us.get(key, 0)
        return FeatureValues(values, present, event_us)


class FakeModels:
    """Scores a row as its dot product with WEIGHTS (+ a quarter per version number); records batch sizes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.failure: Exception | None = None
        self.delay_s = 0.0
        self.gate: asyncio.Event | None = None

    async def infer(
        self, spec: ModelSpec, version: str, inputs: np.ndarray, timeout: float
    ) -> dict[str, np.ndarray]:
        self.calls.append((version, inputs.shape[0]))
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.failure is not None:
            raise self.failure
        scores = inputs.astype(np.float64) @ WEIGHTS.astype(np.float64) + int(version or 0) * 0.25
        return {"score": scores.reshape(-1, 1).astype(np.float64)}


def expected_score(row: Sequence[float], version: str) -> float:
    return (
        float(np.asarray(row, dtype=np.float32).astype(np.float64) @ WEIGHTS.astype(np.float64))
        + int(version) * 0.25
    )


class ListPublisher:
    """Keeps written records; `failure` makes every write raise it (a full disk)."""

    def __init__(self) -> None:
        self.records: list[logging_pb2.InferenceLogRecord] = []
        self.failure: Exception | None = None

    async def write(self, record: logging_pb2.InferenceLogRecord) -> None:
        if self.failure is not None:
            raise self.failure
        self.records.append(record)


class ServedFacts:
    """A fake inference servicer's model facts: RepositoryIndex, ModelMetadata and ModelConfig answered from
    `served` (model -> versions, all READY) and `max_batch_size`."""

    served: Mapping[str, Sequence[str]] = {"toy": ("1", "2")}
    max_batch_size = 0

    async def RepositoryIndex(  # noqa: N802 - gRPC method names
        self, request: ipb.RepositoryIndexRequest, context: object
    ) -> ipb.RepositoryIndexResponse:
        index = ipb.RepositoryIndexResponse.ModelIndex
        return ipb.RepositoryIndexResponse(
            models=[index(name=n, version=v, state="READY") for n, vs in self.served.items() for v in vs]
        )

    async def _served(self, name: str, context: grpc.aio.ServicerContext) -> Sequence[str]:
        if name not in self.served:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not loaded")
        return self.served[name]

    async def ModelMetadata(  # noqa: N802 - gRPC method names
        self, request: ipb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> ipb.ModelMetadataResponse:
        versions = await self._served(request.name, context)
        return ipb.ModelMetadataResponse(name=request.name, versions=list(versions))

    async def ModelConfig(  # noqa: N802 - gRPC method names
        self, request: ipb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> ipb.ModelConfigResponse:
        await self._served(request.name, context)
        return ipb.ModelConfigResponse(
            config=model_config_pb2.ModelConfig(name=request.name, max_batch_size=self.max_batch_size)
        )


def write_layout(folder: Path, name: str = "toy", description: Mapping[str, object] = DESCRIPTION) -> Path:
    """Writes `<folder>/<name>.json` (an input layout); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(description))
    return folder
