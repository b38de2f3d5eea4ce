"""The streaming ingestor on a real Kafka topic: updates are applied, malformed records go to the dead-letter topic."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from infergrid.features.v1 import features_pb2 as pb
from infergrid.features.v1 import features_pb2_grpc
from services.features.config import FeaturesConfig, StreamConfig
from services.features.ingest_stream import StreamIngestor, consumer_conf
from services.features.tests.views import V, string_keys, typed_view
from services.features.wiring import open_feature_store
from stack.kafka import Kafka

pytestmark = pytest.mark.integration
Stub = features_pb2_grpc.FeatureServiceStub


@pytest.fixture
async def stream_config(features_config: FeaturesConfig, kafka_server: Kafka) -> FeaturesConfig:
    suffix = uuid.uuid4().hex[:8]
    config = dataclasses.replace(
        features_config,
        kafka=kafka_server.kafka_config(),  # as the administrator: topics and a group of its own
        stream=StreamConfig(
            stream_topic=f"features.updates.{suffix}",
            stream_dead_letter_topic=f"features.updates.dlq.{suffix}",
            stream_group_id=f"features-ingest-{suffix}",
            stream_poll_timeout_s=0.2,
        ),
    )
    admin = AdminClient(config.kafka.client_conf())
    futures = admin.create_topics(
        [
            NewTopic(t, num_partitions=1, replication_factor=1)
            for t in (config.stream.stream_topic, config.stream.stream_dead_letter_topic)
        ]
    )
    for future in futures.values():
        future.result(timeout=30)
    return config


@pytest.fixture
async def ingestor(stream_config: FeaturesConfig) -> AsyncIterator[None]:
    features = open_feature_store(stream_config)
    await features.open()
    consumer = Consumer(consumer_conf(stream_config))
    producer = Producer(stream_config.kafka.client_conf())
    stop = asyncio.Event()
    task = asyncio.create_task(
        StreamIngestor(features.online, consumer, producer, stream_config.stream).run(stop)
    )
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        consumer.close()
        await features.close()


def _update(view: str, user: str, n: int) -> pb.WriteFeaturesRequest:
    return pb.WriteFeaturesRequest(
        feature_view=view,
        rows=[pb.FeatureRow(entity_key={"id": V(string_value=user)}, values={"f_int64": V(int64_value=n)})],
    )


async def _wait_for(stub: Stub, view: str, users: list[str], expected: list[int]) -> None:
    request = pb.GetOnlineFeaturesRequest(features=[f"{view}:f_int64"], entities={"id": string_keys(*users)})
    deadline = time.monotonic() + 30
    while True:
        got = await stub.GetOnlineFeatures(request)
        if [v.int64_value for v in got.results[0].values] == expected:
            return
        assert time.monotonic() < deadline, f"got {[v.int64_value for v in got.results[0].values]}"
        await asyncio.sleep(0.2)


async def test_updates_are_applied_and_malformed_records_are_dead_lettered(
    features_stub: Stub, stream_config: FeaturesConfig, ingestor: None
) -> None:
    view = f"stream_{uuid.uuid4().hex[:8]}"
    await features_stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=typed_view(view)))
    topic = stream_config.stream.stream_topic
    producer = Producer(stream_config.kafka.client_conf())
    producer.produce(topic, _update(view, "u1", 1).SerializeToString())
    producer.produce(topic, b"\x08\xff\xff garbage")  # not a WriteFeaturesRequest
    producer.produce(topic, _update("no_such_view", "u1", 5).SerializeToString())
    producer.produce(
        topic,
        json.dumps(
            {
                "featureView": view,
                "rows": [
                    {"entityKey": {"id": {"stringValue": "u2"}}, "values": {"f_int64": {"int64Value": "2"}}}
                ],
            }
        ).encode(),
    )
    producer.produce(
        topic,
        json.dumps(
            {
                "featureView": view,
                "rows": [
                    {"entityKey": {"id": {"stringValue": "u2"}}, "values": {"f_int64": {"stringValue": "x"}}}
                ],
            }
        ).encode(),
    )
    producer.flush(10)
    await _wait_for(features_stub, view, ["u1", "u2"], [1, 2])

    # The consumer keeps going after the bad records: a later update is applied too (and seen through the cache).
    producer.produce(topic, _update(view, "u1", 10).SerializeToString())
    producer.flush(10)
    await _wait_for(features_stub, view, ["u1", "u2"], [10, 2])

    dead = Consumer(
        {
            **stream_config.kafka.client_conf(),
            "group.id": f"dlq-reader-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
        }
    )
    dead.subscribe([stream_config.stream.stream_dead_letter_topic])
    records = []
    deadline = time.monotonic() + 30
    while len(records) < 3 and time.monotonic() < deadline:
        records += [m for m in await asyncio.to_thread(dead.consume, 10, 0.5) if m.error() is None]
    dead.close()
    errors = [dict(m.headers() or [])["error"].decode() for m in records]
    assert len(records) == 3, errors
    assert "not a WriteFeaturesRequest" in errors[0]
    assert "'no_such_view' does not exist" in errors[1]
    assert "expected INT64, got STRING" in errors[2]
    assert records[0].value() == b"\x08\xff\xff garbage"

    # Offsets were committed after the writes: the group's committed position is past the last record.
    check = Consumer(consumer_conf(stream_config))
    deadline = time.monotonic() + 15
    while True:
        committed = await asyncio.to_thread(check.committed, [TopicPartition(topic, 0)], 10)
        if committed[0].offset == 6 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    check.close()
    assert committed[0].offset == 6
