"""The inference-log pipeline against real Kafka and Cassandra: producer → topic → logging service → sinks.

The logging service runs as a real process (`python -m services.logging`); records are published with
libs.inference_log. Each test uses its own topic, consumer group, Cassandra keyspace and lake folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cassandra.cluster import Cluster
from confluent_kafka import Consumer, Producer
from inference_log_publisher import BASE_US, PUBLISHER_PREFIX, make_record
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from infergrid.logging.v1 import logging_pb2, logging_pb2_grpc
from libs.checkout import checkout_env
from libs.inference_log import InferenceLogConfig, InferenceLogProducer
from libs.testing import REPO_ROOT, free_port, spawn_module, stop_process, wait_serving
from services.logging.lake import read_table, records
from services.logging.server import SERVICE_NAME
from stack.cassandra import admin_env as cassandra_admin_env
from stack.jaeger import Jaeger
from stack.kafka import Kafka, credential_env
from stack.ports import find_free_ports
from stack.probes import http_get

pytestmark = pytest.mark.integration

PUBLISHER = Path(__file__).with_name("inference_log_publisher.py")
# The query API's operator credential (every tenant's records and GetStats; services/logging/access.py).
ADMIN = (("authorization", "Bearer logging-pipeline-test-admin-token"),)


@dataclass
class Run:
    """Names of one test's topic, group, keyspace and lake."""

    tmp: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def topic(self) -> str:
        return f"inference-log-{self.tag}"

    @property
    def keyspace(self) -> str:
        return f"logging_{self.tag}"

    @property
    def lake(self) -> Path:
        return self.tmp / "lake"

    @property
    def spool(self) -> Path:
        return self.tmp / "spool"


class LoggingService:
    """`python -m services.logging` as a process, its output kept in a file."""

    def __init__(self, run: Run, kafka: Kafka, cassandra_port: int, **extra: str) -> None:
        self.port = free_port()
        self.log_path = run.tmp / f"logging-{self.port}.log"
        self.env = {
            "INFERGRID_LOGGING_PORT": str(self.port),
            "INFERGRID_LOGGING_METRICS_PORT": "0",
            "INFERGRID_LOGGING_DRAIN_SECONDS": "0",
            "INFERGRID_LOGGING_LOG_JSON": "false",
            "INFERGRID_LOGGING_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            # As the administrator: the tests use topics and groups of their own.
            **credential_env(kafka.config, "admin", "INFERGRID_LOGGING_"),
            "INFERGRID_LOGGING_TOPIC": run.topic,
            "INFERGRID_LOGGING_DEAD_LETTER_TOPIC": f"{run.topic}.dlq",
            "INFERGRID_LOGGING_CONSUMER_GROUP": f"logging-{run.tag}",
            "INFERGRID_LOGGING_TOPIC_PARTITIONS": "3",
            "INFERGRID_LOGGING_SESSION_TIMEOUT_MS": "6000",
            "INFERGRID_LOGGING_LAKE_DIR": str(run.lake),
            "INFERGRID_LOGGING_LAKE_ROLL_SECONDS": "1",
            "INFERGRID_LOGGING_CASSANDRA_PORT": str(cassandra_port),
            # As the administrator: the tests use keyspaces of their own.
            **cassandra_admin_env(kafka.config, "INFERGRID_LOGGING_CASSANDRA"),
            "INFERGRID_LOGGING_CASSANDRA_KEYSPACE": run.keyspace,
            "INFERGRID_LOGGING_CASSANDRA_WRITE_CONSISTENCY": "ONE",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "",
            "INFERGRID_LOGGING_QUERY_ADMIN_TOKEN": ADMIN[0][1].removeprefix("Bearer "),
            **extra,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = spawn_module("services.logging", self.env)
        log = self.log_path.open("ab")
        # Drain both pipes so a chatty service never blocks on a full pipe.
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=_copy, args=(stream, log), daemon=True).start()
        asyncio.run(wait_serving(self.port, SERVICE_NAME, None, timeout=90))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def _copy(stream: object, sink: object) -> None:
    for line in iter(stream.readline, b""):  # type: ignore[attr-defined]
        sink.write(line)  # type: ignore[attr-defined]
        sink.flush()  # type: ignore[attr-defined]


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return Run(tmp_path)


@pytest.fixture
def cassandra_session(cassandra_server: object) -> Iterator[Cluster]:
    cluster = Cluster(
        cassandra_server.contact_points,  # type: ignore[attr-defined]
        port=cassandra_server.port,  # type: ignore[attr-defined]
        auth_provider=cassandra_server.auth_provider,  # type: ignore[attr-defined]
    )
    yield cluster.connect()
    cluster.shutdown()


def _cassandra_ids(session: object, run: Run) -> tuple[list[str], int]:
    """Request ids in the by-request table and the row count of the by-model table."""
    try:
        by_request = [
            r.request_id
            for r in session.execute(f"SELECT request_id FROM {run.keyspace}.inference_log_by_tenant_request")
        ]  # type: ignore[attr-defined]
        by_model = session.execute(
            f"SELECT count(*) FROM {run.keyspace}.inference_log_by_tenant_model"
        ).one()[0]  # type: ignore[attr-defined]
    except Exception:  # keyspace or table not there yet
        return [], 0
    return by_request, int(by_model)


def _lake_ids(run: Run, *, dedupe: bool) -> list[str]:
    return read_table(run.lake, dedupe=dedupe).column("request_id").to_pylist() if run.lake.exists() else []


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str, service: LoggingService) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; service log:\n{service.logs()}")


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


def _assert_exactly_once(session: object, run: Run, expected: set[str], *, physical_lake: bool) -> None:
    by_request, by_model = _cassandra_ids(session, run)
    assert len(by_request) == len(expected) and set(by_request) == expected
    assert by_model == len(expected)
    lake = _lake_ids(run, dedupe=False)
    assert set(lake) == expected
    if physical_lake:
        assert len(lake) == len(expected), "a record is in more than one lake file"
    assert len(_lake_ids(run, dedupe=True)) == len(expected)


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
        _wait_for(
            lambda: (
                len(_lake_ids(run, dedupe=False)) >= n and len(_cassandra_ids(cassandra_session, run)[0]) >= n
            ),
            120,
            "all records in both sinks",
            service,
        )
        _assert_exactly_once(cassandra_session, run, expected, physical_lake=True)
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
        _wait_for(
            lambda: len(_cassandra_ids(cassandra_session, run)[0]) >= n // 4,
            120,
            "a quarter of the records",
            service,
        )
        service.kill()  # SIGKILL: no flush, no commit, no leaving the group
        stored = len(_cassandra_ids(cassandra_session, run)[0])
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
            _wait_for(
                lambda: len(set(_lake_ids(run, dedupe=False))) >= n,
                180,
                "every record in the lake after the restart",
                restarted,
            )
            time.sleep(2)  # let a duplicate, if there were one, show up
            expected = {make_record(run.tag, i).request_id for i in range(n)}
            _assert_exactly_once(cassandra_session, run, expected, physical_lake=True)
        finally:
            restarted.stop()
    finally:
        service.stop()


@pytest.fixture
def own_kafka(stack: object) -> Iterator[Kafka]:
    """A Kafka broker of this test's own, free to be stopped and started without disturbing the others."""
    broker, controller = find_free_ports(stack.config.host, 2)  # type: ignore[attr-defined]
    kafka = Kafka(
        stack.config,  # type: ignore[attr-defined]
        name=f"kafka-logging-{os.getpid()}",
        ports={"kafka": broker, "kafka_controller": controller},
    )
    stack.ensure(kafka)  # type: ignore[attr-defined]
    try:
        yield kafka
    finally:
        stack.release(kafka)  # type: ignore[attr-defined]


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
        _wait_for(
            lambda: producer.stats().spooled == n // 2, 30, "the outage's records in the spool", service
        )

        own_kafka.start()
        assert producer.drain_spool(120), f"spool not drained: {producer.stats()}"
        producer.close()
        assert producer.stats().resent == n // 2 + n // 4  # its own records and the previous process's
        assert producer.stats().failed == 0
        assert not list(run.spool.glob("segment-*.spool"))

        expected = {make_record(run.tag, i).request_id for i in range(n)}
        _wait_for(
            lambda: (
                set(_lake_ids(run, dedupe=True)) == expected
                and set(_cassandra_ids(cassandra_session, run)[0]) == expected
            ),
            180,
            "all records after Kafka came back",
            service,
        )
        _assert_exactly_once(cassandra_session, run, expected, physical_lake=False)
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
        _wait_for(lambda: len(_lake_ids(run, dedupe=False)) == 1, 60, "the record in the lake", service)
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
        _wait_for(
            lambda: len(_cassandra_ids(cassandra_session, run)[0]) >= n // 10,
            120,
            "a tenth of the records",
            first,
        )
        second.start()  # joins the group: partitions move while batches are in flight
        publishing.join()
        assert producer.flush(60) == 0
        producer.close()
        _wait_for(
            lambda: len(set(_lake_ids(run, dedupe=False))) >= n, 180, "every record in the lake", second
        )
        time.sleep(2)  # let a duplicate, if there were one, show up
        assert asyncio.run(_records_written(second.port)) > 0, "the second consumer never took over work"
        expected = {make_record(run.tag, i).request_id for i in range(n)}
        _assert_exactly_once(cassandra_session, run, expected, physical_lake=True)
    finally:
        second.stop()
        first.stop()
