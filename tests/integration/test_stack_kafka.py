"""The stack's Kafka answers real confluent-kafka clients: a produce/consume round trip on a new topic."""

import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from stack.kafka import Kafka

pytestmark = pytest.mark.integration


def test_produce_then_consume_on_a_new_topic(kafka_server: Kafka) -> None:
    topic = f"stack-test-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka_server.bootstrap_servers})
    for future in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).values():
        future.result(timeout=30)

    producer = Producer({"bootstrap.servers": kafka_server.bootstrap_servers, "acks": "all"})
    producer.produce(topic, key=b"request-1", value=b"hello", headers=[("trace", b"abc")])
    assert producer.flush(30) == 0

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_server.bootstrap_servers,
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
