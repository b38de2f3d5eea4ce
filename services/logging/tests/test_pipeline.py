"""Pieces of the consumer pipeline that need no Kafka broker: the sampled-flag test on W3C traceparent headers,
and one consumed batch (built as librdkafka hands it) through validation, the store and the lake buffer."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import Message, Producer

from infergrid.logging.v1 import logging_pb2
from libs.kafka import KafkaConfig
from services.logging.config import PipelineConfig
from services.logging.lake import ParquetLake
from services.logging.pipeline import LogPipeline, _sampled
from services.logging.store import StoredRecord
from services.logging.tests.fakes import MemoryLogStore

TOPIC = "infergrid.inference-log.v1"
T0 = 1_780_000_000_000_000

TRACE = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"


@pytest.mark.parametrize(
    ("header", "sampled"),
    [
        (TRACE + b"-01", True),
        (TRACE + b"-03", True),  # sampled + random (W3C trace context level 2)
        (TRACE + b"-00", False),
        (TRACE + b"-02", False),
        (TRACE + b"-zz", False),
        (b"00-short-01", False),
        (None, False),
    ],
)
def test_sampled_flag(header: bytes | None, sampled: bool) -> None:
    assert _sampled(header) is sampled


def _record(request_id: str, time_us: int, version: str) -> bytes:
    record = logging_pb2.InferenceLogRecord(
        schema_version=logging_pb2.SCHEMA_VERSION_1,
        request_id=request_id,
        tenant="acme",
        model="fraud",
        model_version=version,
    )
    record.request_time.FromMicroseconds(time_us)
    return record.SerializeToString()


async def test_a_batch_reaches_the_store_and_the_lake_once_per_record_with_its_kafka_bytes(
    tmp_path: Path,
) -> None:
    holder = Producer({"test.mock.num.brokers": 1})  # librdkafka's in-process cluster, for the dead letters
    (broker,) = holder.list_topics(timeout=5).brokers.values()
    store = MemoryLogStore()
    lake = ParquetLake(tmp_path, TOPIC, roll_bytes=1 << 30, roll_seconds=3600)
    pipeline = LogPipeline(
        PipelineConfig(topic=TOPIC),
        KafkaConfig(kafka_bootstrap_servers=f"{broker.host}:{broker.port}"),
        store,
        lake,
    )
    late, early, other = _record("r-1", T0 + 5, "2"), _record("r-1", T0, "1"), _record("r-2", T0, "1")
    headers = [("traceparent", TRACE + b"-00")]
    try:
        batch = pipeline._prepare([
            Message(topic=TOPIC, partition=0, offset=10, value=late, headers=headers),
            Message(topic=TOPIC, partition=1, offset=3, value=early),  # one prediction logged twice: later wins
            Message(topic=TOPIC, partition=0, offset=11, value=b"\xff not a record"),
            Message(topic=TOPIC, partition=0, offset=12, value=other),
        ])  # fmt: skip
        assert batch.offsets == {0: 13, 1: 4}
        pipeline._begin(batch)
        await pipeline._complete(batch)
    finally:
        pipeline._dlq.flush(5)
        pipeline._thread.shutdown()
    assert store.records == {
        ("acme", "r-1"): StoredRecord("acme", "r-1", "fraud", "2", T0 + 5, late),
        ("acme", "r-2"): StoredRecord("acme", "r-2", "fraud", "1", T0, other),
    }
    assert (pipeline.stats.records_total, pipeline.stats.dead_lettered_total) == (2, 1)
    assert pipeline.stats.records_by_model == {"fraud": 2}
    assert pipeline._pending == {0: 13, 1: 4}  # what the next commit advances to
    assert lake.buffered_bytes == len(late) + len(other)
