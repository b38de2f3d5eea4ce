"""What the inference service says about its models, over the Open Inference Protocol (KServe v2).

The gateway never reads the model repository: the versions a model serves come from `ModelMetadata`, which
of them are ready from `RepositoryIndex`, and the rows one ModelInfer call may carry from `ModelConfig`
(`max_batch_size`). `refresh_facts` reads them over the gateway's inference channel pool into the catalog,
once at start-up and then in the background; a model the service does not answer for keeps what was known.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from libs.pool import ChannelPool, Endpoint
from services.gateway.catalog import ModelCatalog, ModelFacts

log = logging.getLogger(__name__)

_SERVICE = "inference.GRPCInferenceService"
_READY = "READY"


async def read_facts(pool: ChannelPool, names: Iterable[str], timeout_s: float) -> dict[str, ModelFacts]:
    """The facts of each model of `names` the inference service answers for (the others are left out).

    Raises:
        Exception: The repository index could not be read (no endpoint, or every one failed).
    """

    async def _call(method: str, request: object) -> Any:
        async def _on(endpoint: Endpoint) -> Any:
            stub = endpoint.stub(grpc_service_pb2_grpc.GRPCInferenceServiceStub)
            return await getattr(stub, method)(request, timeout=timeout_s)

        return await pool.call(_on, f"{_SERVICE}/{method}")

    index = await _call("RepositoryIndex", pb.RepositoryIndexRequest())
    ready: dict[str, set[str]] = {}
    for entry in index.models:
        if entry.state == _READY:
            ready.setdefault(entry.name, set()).add(entry.version)
    facts: dict[str, ModelFacts] = {}
    for name in names:
        try:
            metadata, config = await asyncio.gather(
                _call("ModelMetadata", pb.ModelMetadataRequest(name=name)),
                _call("ModelConfig", pb.ModelConfigRequest(name=name)),
            )
        except Exception as exc:  # not loaded there (yet), or the call failed: keep what was known
            log.debug("model %s: no facts from the inference service: %s", name, exc)
            continue
        versions = tuple(sorted(metadata.versions))
        facts[name] = ModelFacts(
            versions=versions,
            ready=tuple(v for v in versions if v in ready.get(name, ())),
            max_batch_size=int(config.config.max_batch_size),
        )
    return facts


async def refresh_facts(catalog: ModelCatalog, pool: ChannelPool, timeout_s: float) -> None:
    """Reads the facts of the catalog's models into it; a failure is logged (the known facts stay)."""
    started = time.monotonic()
    try:
        catalog.apply(await read_facts(pool, catalog.names(), timeout_s))
    except Exception as exc:
        log.warning(
            "model facts not read from the inference service (%.2fs): %s", time.monotonic() - started, exc
        )


async def watch_facts(catalog: ModelCatalog, pool: ChannelPool, timeout_s: float, interval_s: float) -> None:
    """Refreshes the catalog's model facts every `interval_s` until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        await refresh_facts(catalog, pool, timeout_s)
