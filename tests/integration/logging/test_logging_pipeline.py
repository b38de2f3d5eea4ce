"""The inference-log pipeline against real Kafka and Cassandra: producer → topic → logging service → sinks.

The logging service runs as a real process (`python -m services.logging`); records are published with
libs.inference_log. Each test uses its own topic, consumer group, Cassandra keyspace and lake folder.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from confluent_kafka import Consumer, Producer
from inference_log_publisher import BASE_US, PUBLISHER_PREFIX, make_record
from logging_harness import (
    ADMIN,
    LoggingService,
    Run,
    assert_exactly_once,
    cassandra_ids,
    lake_ids,
    wait_for,
    wait_for_both_sinks,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from infergrid.logging.v1 import logging_pb2, logging_pb2_grpc
from libs.checkout import checkout_env
from libs.inference_log import InferenceLogConfig, InferenceLogProducer
from libs.testing import REPO_ROOT
from services.logging.lake import read_table, records
from stack.jaeger import Jaeger
from stack.kafka import Kafka, credential_env
from stack.probes import http_get

pytestmark = pytest.mark.integration

PUBLISHER = Path(__file__).with_name("inference_log_publisher.py")


def _producer(run: Run, kafka: Kafka, **overrides: object) -> InferenceLogProducer:
    settings: dict[str, object] = {
        "inference_log_topic": run.topic,
        "inference_log_spool_dir": run.spool,
        "inference_log_resend_interval_s": 0.5,
    }
    settings.update(overrides)
    return InferenceLogProducer(
        InferenceLogConfig(**settings),  # type: ignore[arg-type]
        kafka.kafka_config(),
    )


def test_published_records_land_once_in_each_sink_intact_and_are_served(
    kafka_server: Kafka, cassandra_session: object, run: Run
) -> None:
    n = 3000
    service = LoggingService(run, kafka_server, cassandra_session.cluster.port)  # type: ignore[attr-defined]
    service.start()
    try:
        producer = _producer(run, kafka_server)
        producer.start()
        for i in range(n // 2):
            producer.publish(make_record(run.tag, i))
        # A malformed message in the middle: dead-lettered, and the records after it still arrive.
        raw = Producer(kafka_server.client_conf())
        raw.produce(run.topic, b"\x08\x01\x12", b"bad-key", headers=[("infergrid-schema-version", b"1")])
        assert raw.flush(30) == 0
        for i in range(n // 2, n):
            producer.publish(make_record(run.tag, i))
        assert producer.flush(30) == 0
        producer.close()
        assert producer.stats().sent == n
        assert producer.stats().spooled == 0

        expected = {make_record(run.tag, i).request_id for i in range(n)}
        wait_for(
            lambda: (
                len(lake_ids(run, dedupe=False)) >= n and len(cassandra_ids(cassandra_session, run)[0]) >= n
            ),
            120,
            "all records in both sinks",
            service,
        )
        assert_exactly_once(cassandra_session, run, expected, physical_lake=True)
        published = {make_record(run.tag, i).request_id: make_record(run.tag, i) for i in range(n)}
        for record in records(read_table(run.lake)):
            assert record == published[record.request_id]

        dead = _consume_one(kafka_server, f"{run.topic}.dlq")
        headers = dict(dead.headers() or [])
        assert dead.value() == b"\x08\x01\x12"
        assert b"not an InferenceLogRecord" in headers["infergrid-dlq-reason"]
        assert headers["infergrid-dlq-source"].startswith(run.topic.encode())

        asyncio.run(_check_api(service.port, published))
    finally:
        service.stop()
    assert service.proc is not None and service.proc.returncode == 0, service.logs()


async def _check_api(port: int, published: dict[str, logging_pb2.InferenceLogRecord]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = logging_pb2_grpc.InferenceLogServiceStub(channel)
        some = sorted(published)[17]
        assert (
            await stub.GetRecord(logging_pb2.GetRecordRequest(request_id=some, tenant="acme"), metadata=ADMIN)
            == published[some]
        )
        for missing in (logging_pb2.GetRecordRequest(request_id="missing", tenant="acme"),
                        logging_pb2.GetRecordRequest(request_id=some, tenant="globex")):  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.GetRecord(missing, metadata=ADMIN)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND

        request = logging_pb2.QueryRecordsRequest(
            model="fraud", model_version="2", page_size=97, tenant="acme"
        )
        request.start_time.FromMicroseconds(BASE_US)
        request.end_time.FromMicroseconds(BASE_US + 2 * 3_600_000_000)  # 7200 s: records 0..2999 all inside
        got: list[logging_pb2.InferenceLogRecord] = []
        while True:
            reply = await stub.QueryRecords(request, metadata=ADMIN)
            got.extend(reply.records)
            if not reply.next_page_token:
                break
            request.page_token = reply.next_page_token
        wanted = sorted(
            (r for r in published.values() if r.model == "fraud" and r.model_version == "2"),
            key=lambda r: r.request_time.ToMicroseconds(),
        )
        assert got == wanted

        stats = await stub.GetStats(logging_pb2.GetStatsRequest(), metadata=ADMIN)
        deadline = time.monotonic() + 20
        while stats.consumer_lag != 0 and time.monotonic() < deadline:  # measured every 5 s
            await asyncio.sleep(0.5)
            stats = await stub.GetStats(logging_pb2.GetStatsRequest(), metadata=ADMIN)
        assert stats.consumer_lag == 0
        assert stats.records_total == len(published)
        assert stats.dead_lettered_total == 1
        assert stats.records_by_model["fraud"] + stats.records_by_model["churn"] == len(published)


async def _records_written(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = logging_pb2_grpc.InferenceLogServiceStub(channel)
        return int((await stub.GetStats(logging_pb2.GetStatsRequest(), metadata=ADMIN)).records_total)


def _consume_one(kafka: Kafka, topic: str, timeout: float = 60.0) -> object:
    consumer = Consumer(
        {
            **kafka.client_conf(),
            "group.id": f"check-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                return message
    finally:
        consumer.close()
    raise AssertionError(f"nothing on {topic}")


def test_a_consumer_killed_mid_batch_and_restarted_still_stores_each_record_once(
    kafka_server: Kafka, cassandra_session: object, run: Run
) -> None:
    n = 20_000
    producer = _producer(run, kafka_server)
    producer.start()
    service = LoggingService(
        run,
        kafka_server,
        cassandra_session.cluster.port,  # type: ignore[attr-defined]
        INFERGRID_LOGGING_BATCH_MAX_RECORDS="500",
        INFERGRID_LOGGING_LAKE_ROLL_SECONDS="0.3",
    )
    service.start()  # creates the 3-partition topic
    try:
        for i in range(n):
            producer.publish(make_record(run.tag, i))
        assert producer.flush(60) == 0
        producer.close()
        wait_for(
            lambda: len(cassandra_ids(cassandra_session, run)[0]) >= n // 4,
            120,
            "a quarter of the records",
            service,
        )
        service.kill()  # SIGKILL: no flush, no commit, no leaving the group
        stored = len(cassandra_ids(cassandra_session, run)[0])
        assert stored < n, "the consumer finished before it could be killed mid-way"

        restarted = LoggingService(
            run,
            kafka_server,
            cassandra_session.cluster.port,  # type: ignore[attr-defined]
            INFERGRID_LOGGING_BATCH_MAX_RECORDS="500",
            INFERGRID_LOGGING_LAKE_ROLL_SECONDS="0.3",
        )
        restarted.start()
        try:
            wait_for(
                lambda: len(set(lake_ids(run, dedupe=False))) >= n,
                180,
                "every record in the lake after the restart",
                restarted,
            )
            time.sleep(2)  # let a duplicate, if there were one, show up
            expected = {make_record(run.tag, i).request_id for i in range(n)}
            assert_exactly_once(cassandra_session, run, expected, physical_lake=True)
        finally:
            restarted.stop()
    finally:
        service.stop()


def _publish_in_process(run: Run, kafka: Kafka, first: int, count: int, timeout_ms: int) -> dict[str, int]:
    env = {**checkout_env(), **credential_env(kafka.config, "admin", PUBLISHER_PREFIX)}
    done = subprocess.run(
        [
            sys.executable,
            str(PUBLISHER),
            kafka.bootstrap_servers,
            run.topic,
            str(run.spool),
            run.tag,
            str(first),
            str(count),
            str(timeout_ms),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stats: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return stats


def test_kafka_down_spools_to_disk_and_everything_arrives_across_a_producer_restart(
    own_kafka: Kafka, cassandra_session: object, run: Run
) -> None:
    n = 2000
    service = LoggingService(run, own_kafka, cassandra_session.cluster.port)  # type: ignore[attr-defined]
    service.start()  # creates the topics while Kafka is up
    try:
        # Kafka goes down while records are being published.
        first = _publish_in_process(run, own_kafka, 0, n // 4, 10_000)
        assert first["sent"] == n // 4
        own_kafka.stop()
        # One producer process publishes while Kafka is down, then exits: its records wait in the spool.
        spooled = _publish_in_process(run, own_kafka, n // 4, n // 4, 1500)
        assert spooled["spooled"] == n // 4 and spooled["failed"] == 0 and spooled["sent"] == 0
        assert list(run.spool.glob("segment-*.spool"))

        # The next producer process (a restart) also publishes into the outage.
        producer = _producer(run, own_kafka, inference_log_delivery_timeout_ms=1500)
        producer.start()
        for i in range(n // 2, n):
            producer.publish(make_record(run.tag, i))
        wait_for(lambda: producer.stats().spooled == n // 2, 30, "the outage's records in the spool", service)

        own_kafka.start()
        assert producer.drain_spool(120), f"spool not drained: {producer.stats()}"
        producer.close()
        assert producer.stats().resent == n // 2 + n // 4  # its own records and the previous process's
        assert producer.stats().failed == 0
        assert not list(run.spool.glob("segment-*.spool"))

        expected = {make_record(run.tag, i).request_id for i in range(n)}
        wait_for_both_sinks(cassandra_session, run, expected, "all records after Kafka came back", service)
    finally:
        service.stop()


def test_the_consumer_continues_the_producers_trace_to_the_sink_write(
    kafka_server: Kafka, cassandra_session: object, jaeger_server: Jaeger, run: Run
) -> None:
    service = LoggingService(
        run,
        kafka_server,
        cassandra_session.cluster.port,  # type: ignore[attr-defined]
        OTEL_EXPORTER_OTLP_ENDPOINT=jaeger_server.otlp_grpc_endpoint,
    )
    service.start()
    gateway = TracerProvider(resource=Resource.create({"service.name": f"gateway-test-{run.tag}"}))
    gateway.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=jaeger_server.otlp_grpc_endpoint, insecure=True))
    )
    try:
        producer = _producer(run, kafka_server)
        producer.start()
        with gateway.get_tracer("test").start_as_current_span("predict") as span:
            producer.publish(make_record(run.tag, 1))
            context = span.get_span_context()
        producer.close()
        wait_for(lambda: len(lake_ids(run, dedupe=False)) == 1, 60, "the record in the lake", service)
    finally:
        service.stop()  # flushes the service's spans
        gateway.shutdown()
    trace_id = f"{context.trace_id:032x}"
    spans: dict[str, dict[str, object]] = {}
    deadline = time.monotonic() + 30
    while "inference_log sink write" not in spans and time.monotonic() < deadline:
        answer = http_get(f"{jaeger_server.query_url}/api/traces/{trace_id}")
        if answer is not None and answer.status == 200:
            for found in json.loads(answer.body).get("data") or []:
                spans.update({s["operationName"]: s for s in found["spans"]})
        time.sleep(0.5)
    assert set(spans) >= {"predict", "inference_log sink write"}, f"spans of {trace_id}: {sorted(spans)}"
    sink = spans["inference_log sink write"]
    assert sink["references"] == [
        {"refType": "CHILD_OF", "traceID": trace_id, "spanID": f"{context.span_id:016x}"}
    ]


def test_a_rebalance_to_a_second_consumer_still_stores_each_record_once(
    kafka_server: Kafka, cassandra_session: object, run: Run
) -> None:
    n = 20_000
    settings = {"INFERGRID_LOGGING_BATCH_MAX_RECORDS": "500", "INFERGRID_LOGGING_LAKE_ROLL_SECONDS": "0.3"}
    port = cassandra_session.cluster.port  # type: ignore[attr-defined]
    first = LoggingService(run, kafka_server, port, **settings)
    second = LoggingService(run, kafka_server, port, **settings)
    first.start()
    try:
        producer = _producer(run, kafka_server)
        producer.start()

        def _publish_steadily() -> None:  # ~2,000 records/s for ~10 s: the stream outlives the rebalance
            for i in range(n):
                producer.publish(make_record(run.tag, i))
                if i % 100 == 99:
                    time.sleep(0.05)

        publishing = threading.Thread(target=_publish_steadily)
        publishing.start()
        wait_for(
            lambda: len(cassandra_ids(cassandra_session, run)[0]) >= n // 10,
            120,
            "a tenth of the records",
            first,
        )
        second.start()  # joins the group: partitions move while batches are in flight
        publishing.join()
        assert producer.flush(60) == 0
        producer.close()
        wait_for(lambda: len(set(lake_ids(run, dedupe=False))) >= n, 180, "every record in the lake", second)
        time.sleep(2)  # let a duplicate, if there were one, show up
        assert asyncio.run(_records_written(second.port)) > 0, "the second consumer never took over work"
        expected = {make_record(run.tag, i).request_id for i in range(n)}
        assert_exactly_once(cassandra_session, run, expected, physical_lake=True)
    finally:
        second.stop()
        first.stop()
