"""The stack's Kafka answers real confluent-kafka clients, and only those it knows, each with only its rights.

A produce/consume round trip as the administrator; anonymous clients and wrong passwords refused; the
services' users (`stack.kafka.SERVICE_ACLS`) limited to their own topics and groups; no password in
librdkafka's debug output; an inference-log producer refused by the ACLs keeps its records spooled.
"""

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from infergrid.logging.v1 import logging_pb2
from libs.inference_log import InferenceLogConfig, InferenceLogProducer
from stack.kafka import FEATURES_TOPIC, LOG_DLQ_TOPIC, LOG_GROUP, LOG_TOPIC, Kafka

pytestmark = pytest.mark.integration


def _quiet() -> logging.Logger:
    quiet = logging.getLogger("test.stack.kafka.quiet")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    return quiet


def _create(admin: AdminClient, *topics: str) -> None:
    for future in admin.create_topics(
        [NewTopic(t, num_partitions=1, replication_factor=1) for t in topics]
    ).values():
        try:
            future.result(timeout=30)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


@pytest.fixture(scope="module")
def log_topics(kafka_server: Kafka) -> Iterator[None]:
    """The stack's inference-log topics, created by the administrator (as the logging service would)."""
    _create(AdminClient(kafka_server.client_conf()), LOG_TOPIC, LOG_DLQ_TOPIC, FEATURES_TOPIC)
    yield


def _delivery_error(conf: dict[str, Any], topic: str) -> KafkaError | None:
    """Produces one record to `topic`; the delivery report's error (None: acknowledged)."""
    errors: list[KafkaError | None] = []
    producer = Producer({**conf, "message.timeout.ms": 20_000, "logger": _quiet()})
    producer.produce(topic, b"acl-test", key=b"acl-test", on_delivery=lambda err, _msg: errors.append(err))
    producer.flush(30)
    assert errors, f"no delivery report for {topic}"
    return errors[0]


def _first_error(
    conf: dict[str, Any], topic: str, group: str, *, subscribe: bool = False
) -> KafkaError | None:
    """Reads `topic` from its start as `group` (assigned; subscribed, joining the group, when `subscribe`);
    the first error the consumer reports (None: a record came)."""
    consumer = Consumer({**conf, "group.id": group, "auto.offset.reset": "earliest", "logger": _quiet()})
    try:
        if subscribe:
            consumer.subscribe([topic])
        else:
            consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None:
                continue
            return message.error()
        raise AssertionError(f"neither a record nor an error on {topic} within 30 s")
    finally:
        consumer.close()


def test_produce_then_consume_on_a_new_topic(kafka_server: Kafka) -> None:
    topic = f"stack-test-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(kafka_server.client_conf())
    _create(admin, topic)

    producer = Producer({**kafka_server.client_conf(), "acks": "all"})
    producer.produce(topic, key=b"request-1", value=b"hello", headers=[("trace", b"abc")])
    assert producer.flush(30) == 0

    consumer = Consumer(
        {
            **kafka_server.client_conf(),
            "group.id": f"stack-test-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
        }
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        message = None
        while message is None and time.monotonic() < deadline:
            candidate = consumer.poll(1.0)
            if candidate is not None and candidate.error() is None:
                message = candidate
        assert message is not None, f"no message on {topic} within 60 s"
        assert message.key() == b"request-1"
        assert message.value() == b"hello"
        assert message.headers() == [("trace", b"abc")]
    finally:
        consumer.close()
        for future in admin.delete_topics([topic]).values():
            future.result(timeout=30)


def test_anonymous_clients_and_wrong_passwords_are_refused(kafka_server: Kafka) -> None:
    errors: list[KafkaError] = []
    wrong = {**kafka_server.client_conf("gateway"), "sasl.password": "not-the-password"}
    for conf in ({"bootstrap.servers": kafka_server.bootstrap_servers}, wrong):
        admin = AdminClient({**conf, "logger": _quiet(), "error_cb": errors.append})
        with pytest.raises(KafkaException):
            admin.list_topics(timeout=5)
        admin.poll(1)  # serves error_cb
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors
    # The same broker answers the right password.
    assert AdminClient(kafka_server.client_conf("gateway")).list_topics(timeout=10).brokers


@pytest.mark.usefixtures("log_topics")
def test_the_gateway_may_only_produce_the_inference_log(kafka_server: Kafka) -> None:
    gateway = kafka_server.client_conf("gateway")
    assert _delivery_error(gateway, LOG_TOPIC) is None
    refused = _delivery_error(gateway, LOG_DLQ_TOPIC)
    assert refused is not None and refused.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    error = _first_error(gateway, LOG_TOPIC, LOG_GROUP)
    assert error is not None and error.code() in (
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
    ), error


@pytest.mark.usefixtures("log_topics")
def test_the_logging_consumer_may_only_read_the_log_and_write_its_dead_letters(kafka_server: Kafka) -> None:
    logging_user = kafka_server.client_conf("logging")
    assert _delivery_error(kafka_server.client_conf("gateway"), LOG_TOPIC) is None  # something to read
    assert _first_error(logging_user, LOG_TOPIC, LOG_GROUP) is None
    refused = _delivery_error(logging_user, LOG_TOPIC)
    assert refused is not None and refused.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert _delivery_error(logging_user, LOG_DLQ_TOPIC) is None
    # Another group, another service's topic, a new topic: refused.
    other_group = _first_error(logging_user, LOG_TOPIC, "someone-else", subscribe=True)
    assert other_group is not None and other_group.code() == KafkaError.GROUP_AUTHORIZATION_FAILED
    other_topic = _first_error(logging_user, FEATURES_TOPIC, LOG_GROUP, subscribe=True)
    assert other_topic is not None and other_topic.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    admin = AdminClient({**logging_user, "logger": _quiet()})
    (future,) = admin.create_topics([NewTopic(f"not-mine-{uuid.uuid4().hex[:8]}", 1, 1)]).values()
    with pytest.raises(KafkaException) as refusal:
        future.result(timeout=30)
    assert refusal.value.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_librdkafka_debug_output_never_holds_the_password(kafka_server: Kafka) -> None:
    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger(f"test.stack.kafka.debug.{uuid.uuid4().hex[:6]}")
    logger.addHandler(_Collect())
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    conf = kafka_server.client_conf("gateway")
    admin = AdminClient({**conf, "debug": "all", "logger": logger})
    assert admin.list_topics(timeout=10).brokers
    admin.poll(0.5)  # serves the queued log lines
    assert any("sasl" in line.lower() for line in lines), "librdkafka printed nothing about SASL"
    assert not [line for line in lines if conf["sasl.password"] in line]


@pytest.mark.usefixtures("log_topics")
def test_a_producer_refused_by_the_acls_keeps_its_records_until_it_may_write(
    kafka_server: Kafka, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = InferenceLogConfig(
        inference_log_topic=LOG_TOPIC,
        inference_log_spool_dir=tmp_path / "spool",
        inference_log_delivery_timeout_ms=5000,
    )
    # The logging service's user may not write the inference log.
    producer = InferenceLogProducer(config, kafka_server.kafka_config("logging"))
    try:
        producer.start()
        for i in range(3):
            producer.publish(logging_pb2.InferenceLogRecord(request_id=f"acl-{i}", model="fraud"))
        deadline = time.monotonic() + 30
        while producer.stats().spooled < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        stats = producer.stats()
        assert (stats.spooled, stats.sent, stats.quarantined, stats.failed) == (3, 0, 0, 0)
        assert stats.spool_bytes > 0
        assert any(
            r.levelno == logging.ERROR and "TOPIC_AUTHORIZATION_FAILED" in r.getMessage()
            for r in caplog.records
        ), [r.getMessage() for r in caplog.records]
    finally:
        producer.close()
    assert any((tmp_path / "spool").iterdir())
    # Fixed (the gateway's user, whose idempotent producer needs only Write): the spooled records go.
    fixed = InferenceLogProducer(config, kafka_server.kafka_config("gateway"))
    try:
        fixed.start()
        assert fixed.drain_spool(60), fixed.stats()
        assert fixed.stats().resent == 3
    finally:
        fixed.close()
