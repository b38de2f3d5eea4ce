"""An in-memory LogStore with the Cassandra store's ordering and paging semantics, and a server on one."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest

from infergrid.logging.v1 import logging_pb2_grpc
from libs.server import ServerConfig
from services.logging.config import LoggingConfig, PipelineConfig, QueryConfig
from services.logging.paging import Cursor
from services.logging.server import create_server
from services.logging.store import RecordPage, RecordQuery, StoredRecord, hour_of


class MemoryLogStore:
    """Records by (tenant, request id); queries walk one tenant's (hour, time, request id) like the by-model table."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], StoredRecord] = {}

    async def write(self, records: Sequence[StoredRecord]) -> None:
        for r in records:
            known = self.records.get((r.tenant, r.request_id))
            if known is None or r.request_time_us >= known.request_time_us:  # the later request time wins
                self.records[(r.tenant, r.request_id)] = r

    async def get(self, tenant: str, request_id: str) -> bytes | None:
        record = self.records.get((tenant, request_id))
        return record.payload if record else None

    async def query(self, query: RecordQuery) -> RecordPage:
        rows = sorted(
            (r for r in self.records.values() if r.model == query.model and r.tenant == query.tenant),
            key=lambda r: (r.request_time_us, r.request_id),
        )
        cursor = query.cursor or Cursor(hour=hour_of(query.start_us))
        out: list[bytes] = []
        last: tuple[int, str] | None = None
        for r in rows:
            if (
                not query.start_us <= r.request_time_us < query.end_us
                or hour_of(r.request_time_us) < cursor.hour
            ):
                continue
            key = (r.request_time_us, r.request_id)
            if cursor.after_time_us is not None and key <= (cursor.after_time_us, cursor.after_request_id):
                continue
            if len(out) == query.page_size:
                assert last is not None
                return RecordPage(out, Cursor(hour_of(last[0]), last[0], last[1]))
            last = key
            if not query.model_version or r.model_version == query.model_version:
                out.append(r.payload)
        return RecordPage(out, None)

    async def ready(self) -> bool:
        return True


@contextlib.asynccontextmanager
async def served(
    store: MemoryLogStore, query: QueryConfig, **channel: Any
) -> AsyncIterator[logging_pb2_grpc.InferenceLogServiceStub]:
    """A started logging server (no consumer) on `store`, and a stub on a channel to it."""
    config = LoggingConfig(server=ServerConfig(port=0), pipeline=PipelineConfig(consume=False), query=query)
    server = await create_server(config, store=store)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", **channel) as ch:
            yield logging_pb2_grpc.InferenceLogServiceStub(ch)
    finally:
        await server.stop(0, 0.5)


async def refused(call: object, code: grpc.StatusCode, text: str = "") -> None:
    """Asserts that the call fails with `code`, its details holding `text`."""
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call  # type: ignore[misc]
    assert error.value.code() == code, error.value.details()
    assert text in (error.value.details() or "")
