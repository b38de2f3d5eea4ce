"""InferenceLogService over a real gRPC channel, on an in-memory store: look-ups, paging, stats, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from infergrid.logging.v1 import logging_pb2, logging_pb2_grpc
from libs.server import ServerConfig
from libs.testing import TEST_API_KEY, WithApiKey, assert_bad_config_exits, assert_serves
from services.logging.config import LoggingConfig, PipelineConfig, QueryConfig
from services.logging.server import SERVICE_NAME, create_server
from services.logging.store import StoredRecord
from services.logging.tests.fakes import MemoryLogStore, refused, served

BASE_US = 1_780_000_000_000_000
HOUR_US = 3_600_000_000


TENANT = "acme"
NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT


def _record(
    i: int, *, model: str = "fraud", version: str = "1", time_us: int | None = None, tenant: str = TENANT
) -> StoredRecord:
    proto = logging_pb2.InferenceLogRecord(
        schema_version=logging_pb2.SCHEMA_VERSION_1,
        request_id=f"req-{i:04d}",
        tenant=tenant,
        model=model,
        model_version=version,
    )
    time_us = BASE_US + i * 600_000_000 if time_us is None else time_us
    proto.request_time.FromMicroseconds(time_us)
    proto.outputs["score"].float_value = 0.25
    return StoredRecord(tenant, proto.request_id, model, version, time_us, proto.SerializeToString())


@pytest.fixture
async def stub() -> AsyncIterator[logging_pb2_grpc.InferenceLogServiceStub]:
    store = MemoryLogStore()
    # 30 records of fraud every 10 minutes (5 hours), alternating versions; 3 of another model.
    await store.write([_record(i, version=str(1 + i % 2)) for i in range(30)])
    await store.write([_record(100 + i, model="churn") for i in range(3)])
    # Another tenant used the same request ids for records of its own (a different version, other outputs).
    await store.write([_record(i, version="9", tenant="globex") for i in range(30)])
    # The operator's admin token (every tenant's records, GetStats), sent on every call (WithApiKey).
    async with served(
        store, QueryConfig(query_admin_token=TEST_API_KEY), interceptors=[WithApiKey()]
    ) as stub:
        yield stub


def _range(start_us: int, end_us: int, **kwargs: object) -> logging_pb2.QueryRecordsRequest:
    kwargs.setdefault("tenant", TENANT)
    request = logging_pb2.QueryRecordsRequest(model="fraud", **kwargs)  # type: ignore[arg-type]
    request.start_time.FromMicroseconds(start_us)
    request.end_time.FromMicroseconds(end_us)
    return request


async def test_serves_health_and_reflection() -> None:
    config = LoggingConfig(server=ServerConfig(port=0), pipeline=PipelineConfig(consume=False))
    await assert_serves(await create_server(config, store=MemoryLogStore()), SERVICE_NAME)


def test_malformed_port_exits_naming_the_variable() -> None:
    assert_bad_config_exits("services.logging", "INFERGRID_LOGGING_PORT", "not-a-port")


async def test_get_record_by_request_id(stub: logging_pb2_grpc.InferenceLogServiceStub) -> None:
    record = await stub.GetRecord(logging_pb2.GetRecordRequest(request_id="req-0007", tenant=TENANT))
    assert record.model == "fraud"
    assert record.outputs["score"].float_value == 0.25
    assert (record.tenant, record.model_version) == (TENANT, "2")
    other = await stub.GetRecord(logging_pb2.GetRecordRequest(request_id="req-0007", tenant="globex"))
    assert (other.tenant, other.model_version) == ("globex", "9")


async def test_another_tenants_record_is_not_found(stub: logging_pb2_grpc.InferenceLogServiceStub) -> None:
    # acme's churn record; globex has no req-0100
    await refused(
        stub.GetRecord(logging_pb2.GetRecordRequest(request_id="req-0100", tenant="globex")), NOT_FOUND
    )


async def test_a_read_without_a_tenant_is_invalid(stub: logging_pb2_grpc.InferenceLogServiceStub) -> None:
    for call in (
        stub.GetRecord(logging_pb2.GetRecordRequest(request_id="req-0007")),
        stub.QueryRecords(_range(BASE_US, BASE_US + HOUR_US, tenant="")),
        stub.GetRecord(logging_pb2.GetRecordRequest(request_id="req-0007", tenant="t" * 129)),
    ):
        await refused(call, INVALID, "tenant")


async def test_unknown_request_id_is_not_found_naming_it(
    stub: logging_pb2_grpc.InferenceLogServiceStub,
) -> None:
    await refused(
        stub.GetRecord(logging_pb2.GetRecordRequest(request_id="nope", tenant=TENANT)), NOT_FOUND, "nope"
    )


async def test_empty_request_id_is_invalid(stub: logging_pb2_grpc.InferenceLogServiceStub) -> None:
    await refused(stub.GetRecord(logging_pb2.GetRecordRequest(tenant=TENANT)), INVALID, "request_id")


async def test_query_pages_through_a_range_oldest_first(
    stub: logging_pb2_grpc.InferenceLogServiceStub,
) -> None:
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        reply = await stub.QueryRecords(_range(BASE_US, BASE_US + 5 * HOUR_US, page_size=7, page_token=token))
        seen.extend(r.request_id for r in reply.records)
        pages += 1
        token = reply.next_page_token
        if not token:
            break
    assert seen == [f"req-{i:04d}" for i in range(30)]  # acme's only: globex's same ids are not listed
    assert pages >= 5
    other = await stub.QueryRecords(_range(BASE_US, BASE_US + 5 * HOUR_US, page_size=100, tenant="globex"))
    assert {(r.tenant, r.model_version) for r in other.records} == {("globex", "9")}
    assert len(other.records) == 30


async def test_query_filters_by_version_and_range(stub: logging_pb2_grpc.InferenceLogServiceStub) -> None:
    reply = await stub.QueryRecords(
        _range(BASE_US + HOUR_US, BASE_US + 2 * HOUR_US, model_version="2", page_size=100)
    )
    assert [r.request_id for r in reply.records] == [f"req-{i:04d}" for i in range(6, 12) if i % 2 == 1]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (logging_pb2.QueryRecordsRequest(tenant=TENANT), "model"),
        (logging_pb2.QueryRecordsRequest(model="fraud", tenant=TENANT), "start_time"),
        (_range(BASE_US, BASE_US), "end_time"),
        (_range(BASE_US, BASE_US + 1, page_size=100_000), "page_size"),
        (_range(BASE_US, BASE_US + 1, page_token="%%%not-a-token"), "page_token"),
    ],
)
async def test_bad_queries_are_invalid_naming_the_field(
    stub: logging_pb2_grpc.InferenceLogServiceStub, query: logging_pb2.QueryRecordsRequest, field: str
) -> None:
    await refused(stub.QueryRecords(query), INVALID, field)


async def test_a_token_of_another_query_is_refused(stub: logging_pb2_grpc.InferenceLogServiceStub) -> None:
    first = await stub.QueryRecords(_range(BASE_US, BASE_US + 5 * HOUR_US, page_size=2))
    assert first.next_page_token
    token = first.next_page_token
    await refused(
        stub.QueryRecords(_range(BASE_US, BASE_US + 4 * HOUR_US, page_size=2, page_token=token)), INVALID
    )
    # Another tenant cannot continue acme's query.
    other = _range(BASE_US, BASE_US + 5 * HOUR_US, page_size=2, page_token=token, tenant="globex")
    await refused(stub.QueryRecords(other), INVALID)


async def test_stats_without_a_consumer_are_zero(stub: logging_pb2_grpc.InferenceLogServiceStub) -> None:
    stats = await stub.GetStats(logging_pb2.GetStatsRequest(model="fraud"))
    assert stats.records_total == 0
    assert dict(stats.records_by_model) == {"fraud": 0}
