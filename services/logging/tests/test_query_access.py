"""Who may read the inference log: tenants' API keys (their own tenant only), the operator's admin token, nobody else.

A real gRPC server on an in-memory store, the platform and key files the gateway reads (libs/apikeys.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from infergrid.logging.v1 import logging_pb2, logging_pb2_grpc
from libs.apikeys import add_key, load_keys, write_keys
from libs.config import load_config, redacted
from services.logging.config import ENV_PREFIX, LoggingConfig, QueryConfig
from services.logging.store import StoredRecord
from services.logging.tests.fakes import MemoryLogStore, refused, served

ADMIN = "admin-token-for-the-logging-unit-tests"
ACME_KEY = "ig_acme-key-for-the-logging-unit-tests"
GLOBEX_KEY = "ig_globex-key-for-the-logging-unit-tests"
ORPHAN_KEY = "ig_key-of-a-tenant-the-platform-does-not-know"
PLATFORM = """
admission: {placement: gateway}
rate_limit_tiers: {t: {requests_per_second: 1, burst: 1}}
tenants: {acme: {tier: t, models: ['*']}, globex: {tier: t, models: [fraud]}}
"""
BASE_US = 1_780_000_000_000_000
HOUR_US = 3_600_000_000
UNAUTHENTICATED, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


def _record(i: int, *, version: str = "1", tenant: str = "acme") -> StoredRecord:
    proto = logging_pb2.InferenceLogRecord(
        request_id=f"req-{i:04d}", tenant=tenant, model="fraud", model_version=version
    )
    proto.request_time.FromMicroseconds(BASE_US + i)
    return StoredRecord(tenant, proto.request_id, "fraud", version, BASE_US + i, proto.SerializeToString())


def _files(folder: Path) -> Path:
    platform = folder / "platform.yaml"
    platform.write_text(PLATFORM)
    for tenant, key in (("acme", ACME_KEY), ("globex", GLOBEX_KEY), ("gone", ORPHAN_KEY)):
        add_key(folder / "keys.yaml", tenant, tenant, key)
    return platform


@pytest.fixture
async def stub(tmp_path: Path) -> AsyncIterator[logging_pb2_grpc.InferenceLogServiceStub]:
    store = MemoryLogStore()
    await store.write(
        [_record(i) for i in range(3)] + [_record(i, version="9", tenant="globex") for i in range(3)]
    )
    query = QueryConfig(query_platform_file=_files(tmp_path), query_keys_poll_s=0.05, query_admin_token=ADMIN)
    async with served(store, query) as stub:
        yield stub


def _key(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


def _query(tenant: str = "") -> logging_pb2.QueryRecordsRequest:
    request = logging_pb2.QueryRecordsRequest(model="fraud", tenant=tenant, page_size=100)
    request.start_time.FromMicroseconds(BASE_US)
    request.end_time.FromMicroseconds(BASE_US + HOUR_US)
    return request


def _calls(
    stub: logging_pb2_grpc.InferenceLogServiceStub,
    metadata: tuple[tuple[str, str], ...],
    tenant: str = "acme",
) -> list[object]:
    return [
        stub.GetRecord(logging_pb2.GetRecordRequest(request_id="req-0001", tenant=tenant), metadata=metadata),
        stub.QueryRecords(_query(tenant), metadata=metadata),
        stub.GetStats(logging_pb2.GetStatsRequest(), metadata=metadata),
    ]


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        _key(""),
        _key("ig_unknown"),
        (("authorization", "Basic " + ADMIN),),
        _key(ADMIN[:-1]),
        _key(ACME_KEY.upper()),
    ],
    ids=[
        "none",
        "empty",
        "unknown key",
        "admin token, not bearer",
        "admin token prefix",
        "key in upper case",
    ],
)
async def test_without_a_valid_credential_every_call_is_unauthenticated(
    stub: logging_pb2_grpc.InferenceLogServiceStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    for call in _calls(stub, metadata):
        await refused(call, UNAUTHENTICATED)


async def test_a_tenants_key_reads_its_own_records_only(
    stub: logging_pb2_grpc.InferenceLogServiceStub,
) -> None:
    acme = _key(ACME_KEY)
    mine = await stub.GetRecord(
        logging_pb2.GetRecordRequest(request_id="req-0001", tenant="acme"), metadata=acme
    )
    assert (mine.tenant, mine.model_version) == ("acme", "1")
    # No tenant named: the key's own (not globex's record with the same id).
    same = await stub.GetRecord(logging_pb2.GetRecordRequest(request_id="req-0001"), metadata=acme)
    assert same == mine
    listed = await stub.QueryRecords(_query(), metadata=(("authorization", f"Bearer {ACME_KEY}"),))
    assert {r.tenant for r in listed.records} == {"acme"} and len(listed.records) == 3
    for call in _calls(stub, acme, tenant="globex")[:2]:
        await refused(call, DENIED, "tenant: this API key reads only the records of tenant 'acme'")
    await refused(stub.GetStats(logging_pb2.GetStatsRequest(), metadata=acme), DENIED, "admin token")
    theirs = await stub.QueryRecords(_query("globex"), metadata=_key(GLOBEX_KEY))
    assert {(r.tenant, r.model_version) for r in theirs.records} == {("globex", "9")}


async def test_a_key_whose_tenant_is_not_configured_is_denied(
    stub: logging_pb2_grpc.InferenceLogServiceStub,
) -> None:
    for call in _calls(stub, _key(ORPHAN_KEY), tenant="gone"):
        await refused(call, DENIED, "not configured")


async def test_the_admin_token_reads_every_tenant_and_the_stats(
    stub: logging_pb2_grpc.InferenceLogServiceStub,
) -> None:
    admin = (("authorization", f"Bearer {ADMIN}"),)
    for tenant, version in (("acme", "1"), ("globex", "9")):
        record = await stub.GetRecord(
            logging_pb2.GetRecordRequest(request_id="req-0002", tenant=tenant), metadata=admin
        )
        assert (record.tenant, record.model_version) == (tenant, version)
    assert len((await stub.QueryRecords(_query("globex"), metadata=_key(ADMIN))).records) == 3
    await stub.GetStats(logging_pb2.GetStatsRequest(), metadata=admin)
    # The operator reads one named tenant at a time.
    await refused(stub.QueryRecords(_query(), metadata=admin), grpc.StatusCode.INVALID_ARGUMENT, "tenant")


async def test_a_revoked_key_is_refused_once_the_key_file_drops_it(
    stub: logging_pb2_grpc.InferenceLogServiceStub, tmp_path: Path
) -> None:
    acme = _key(ACME_KEY)
    await stub.QueryRecords(_query(), metadata=acme)
    keys = tmp_path / "keys.yaml"
    write_keys(keys, [k for k in load_keys(keys).values() if k.tenant != "acme"])
    os.utime(keys, ns=(0, 1))  # a new stamp even within the file system's time resolution
    for _ in range(200):  # the watcher polls every 0.05 s
        try:
            await stub.QueryRecords(_query(), metadata=acme)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == UNAUTHENTICATED, exc.details()
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the revoked key was still admitted")
    await stub.QueryRecords(_query("globex"), metadata=_key(GLOBEX_KEY))  # the other keys stay


async def test_with_no_keys_and_no_admin_token_nobody_reads() -> None:
    async with served(MemoryLogStore(), QueryConfig()) as stub:
        for metadata in ((), _key(ACME_KEY), _key(ADMIN)):
            for call in _calls(stub, metadata):
                await refused(call, UNAUTHENTICATED)


def test_the_admin_token_comes_from_a_private_file_and_is_never_printed(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text(ADMIN + "\n")
    token.chmod(0o600)
    config = load_config(LoggingConfig, {f"{ENV_PREFIX}QUERY_ADMIN_TOKEN_FILE": str(token)}, ENV_PREFIX)
    assert config.query.query_admin_token == ADMIN
    assert ADMIN not in repr(redacted(config))
