"""The stream ingestor's batch processing with in-memory fakes: writes, dead letters, retries while the store is down."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from infergrid.features.v1 import features_pb2 as pb
from services.features.config import FeaturesConfig, StreamConfig
from services.features.errors import InvalidArgument
from services.features.ingest_stream import StreamIngestor
from services.features.online import OnlineFeatures
from services.features.registry import Registry
from services.features.tests.fakes import InMemoryCache, InMemoryOnlineStore, InMemoryViewStore
from services.features.tests.views import V, typed_row, typed_view


@dataclass
class FakeMessage:
    payload: bytes | None
    offset_: int = 0
    headers_: list[tuple[str, bytes]] = field(default_factory=list)

    def value(self) -> bytes | None:
        return self.payload

    def key(self) -> bytes | None:
        return b"k"

    def headers(self) -> list[tuple[str, bytes]]:
        return self.headers_

    def topic(self) -> str:
        return "updates"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self.offset_

    def error(self) -> Any:
        return None


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def produce(
        self, topic: str, value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> None:
        self.sent.append({"topic": topic, "value": value, "headers": dict(headers)})

    def flush(self, timeout: float) -> int:
        return 0


async def _ingestor() -> tuple[StreamIngestor, InMemoryOnlineStore, FakeProducer, OnlineFeatures]:
    registry = Registry(InMemoryViewStore())
    await registry.apply(typed_view("v"))
    store = InMemoryOnlineStore()
    online = OnlineFeatures(registry, InMemoryCache(), store, FeaturesConfig())
    producer = FakeProducer()
    return (
        StreamIngestor(online, consumer=None, producer=producer, config=StreamConfig()),
        store,
        producer,
        online,
    )


def _update(user: str, n: int, view: str = "v", **values: V) -> bytes:
    """An update of entity `user` of `view`: `values`, or f_int64 = `n`."""
    row = typed_row(user, **(values or {"f_int64": V(int64_value=n)}))
    return pb.WriteFeaturesRequest(feature_view=view, rows=[row]).SerializeToString()


def _json_update(key: dict[str, str]) -> bytes:
    """The JSON form of an update of entity `key` (a Value in JSON) of view v: f_int64 = 2."""
    row = {"entityKey": {"id": key}, "values": {"f_int64": {"int64Value": "2"}}}
    return json.dumps({"featureView": "v", "rows": [row]}).encode()


async def test_good_records_are_written_and_bad_ones_dead_lettered() -> None:
    ingestor, store, producer, _ = await _ingestor()
    traceparent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    messages = [
        FakeMessage(_update("a", 1), 0, [("traceparent", traceparent)]),
        FakeMessage(b"\xff\xfe not protobuf", 1),
        FakeMessage(None, 2),
        FakeMessage(_update("a", 1, view="nope"), 3),
        FakeMessage(_json_update({"stringValue": "b"}), 4),
        FakeMessage(_json_update({"int64Value": "1"}), 5),
    ]
    outcome = await ingestor.process(messages)  # type: ignore[arg-type]
    assert outcome.written_rows == 2 and outcome.dead_lettered == 4
    assert {key for _, key in store.rows} == {b"a", b"b"}
    assert [m["headers"]["source.offset"] for m in producer.sent] == [b"1", b"2", b"3", b"5"]
    assert b"does not exist" in producer.sent[2]["headers"]["error"]
    assert b"expected STRING, got INT64" in producer.sent[3]["headers"]["error"]
    assert all(m["topic"] == StreamConfig().stream_dead_letter_topic for m in producer.sent)


async def test_a_batch_is_retried_while_the_store_is_down() -> None:
    ingestor, store, _, _ = await _ingestor()
    store.down = True

    async def recover() -> None:
        await asyncio.sleep(0.5)
        store.down = False

    recovery = asyncio.create_task(recover())
    outcome = await asyncio.wait_for(ingestor.process([FakeMessage(_update("c", 3))]), 10)  # type: ignore[list-item]
    await recovery
    assert outcome.written_rows == 1 and (("v", b"c") in store.rows)


async def test_bad_values_and_times_are_dead_lettered_and_the_rest_written() -> None:
    ingestor, store, producer, _ = await _ingestor()
    future = pb.WriteFeaturesRequest.FromString(_update("f", 1))
    future.rows[0].event_timestamp.FromSeconds(int(time.time()) + 86_400)
    overflow = pb.WriteFeaturesRequest.FromString(_update("o", 1))
    overflow.rows[0].event_timestamp.seconds = 2**62  # past what ToMicroseconds/">q" can hold
    messages = [
        FakeMessage(future.SerializeToString(), 0),
        FakeMessage(overflow.SerializeToString(), 1),
        FakeMessage(_update("n", 0, f_float=V(float_value=float("nan"))), 2),
        FakeMessage(_update("good", 1), 3),
    ]
    outcome = await ingestor.process(messages)  # type: ignore[arg-type]
    assert outcome.written_rows == 1 and outcome.dead_lettered == 3
    assert {key for _, key in store.rows} == {b"good"}
    errors = [m["headers"]["error"] for m in producer.sent]
    assert b"rows[0].event_timestamp" in errors[0] and b"future" in errors[0]
    assert b"rows[0].event_timestamp" in errors[1]
    assert b"rows[0].values['f_float']" in errors[2]


async def test_a_record_the_store_refuses_is_dead_lettered_and_the_batch_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ingestor, store, producer, _online = await _ingestor()
    real_write = store.write

    async def refuse_b(view: Any, rows: Any) -> None:
        if any(row.key == b"b" for row in rows):
            raise InvalidArgument("rows: the store refused the write: out of bound timestamp")
        if any(row.key == b"c" for row in rows):
            raise RuntimeError("a bug in the store")
        await real_write(view, rows)

    monkeypatch.setattr(store, "write", refuse_b)
    messages = [FakeMessage(_update(user, 1), i) for i, user in enumerate("abcd")]
    outcome = await ingestor.process(messages)  # type: ignore[arg-type]
    assert outcome.written_rows == 2 and outcome.dead_lettered == 2
    assert {key for _, key in store.rows} == {b"a", b"d"}
    assert [m["headers"]["source.offset"] for m in producer.sent] == [b"1", b"2"]
    assert b"out of bound timestamp" in producer.sent[0]["headers"]["error"]
    assert producer.sent[1]["headers"]["error"] == b"internal error while writing the record"


async def test_an_unexpected_error_on_one_record_never_stops_the_consumer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ingestor, _store, producer, online = await _ingestor()
    real_prepare = online.prepare_rows

    def explode_on_b(view: Any, rows: Any) -> Any:
        if rows and rows[0].entity_key["id"].string_value == "b":
            raise struct.error("a bug")
        return real_prepare(view, rows)

    monkeypatch.setattr(online, "prepare_rows", explode_on_b)
    outcome = await ingestor.process([FakeMessage(_update(u, 1), i) for i, u in enumerate("ab")])  # type: ignore[arg-type]
    assert outcome.written_rows == 1 and outcome.dead_lettered == 1
    assert producer.sent[0]["headers"]["error"] == b"internal error while validating the record"


class _ErrorOnlyConsumer:
    """A consumer whose polls return only error events (the topic not created yet): nothing to commit."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.polls = 0

    def subscribe(self, topics: list[str]) -> None:
        pass

    def assignment(self) -> list[Any]:
        return []

    def position(self, partitions: list[Any]) -> list[Any]:
        return []

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        from confluent_kafka import KafkaError

        self.polls += 1
        if self.polls >= 3:
            self.stop.set()
        error = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)

        class _ErrorEvent(FakeMessage):
            def error(self) -> Any:
                return error

        return [_ErrorEvent(None)]

    def commit(self, asynchronous: bool) -> None:
        from confluent_kafka import KafkaError, KafkaException

        raise KafkaException(KafkaError(KafkaError._NO_OFFSET))


async def test_polls_of_error_events_only_never_crash_the_consumer() -> None:
    _, _store, producer, online = await _ingestor()
    stop = asyncio.Event()
    consumer = _ErrorOnlyConsumer(stop)
    ingestor = StreamIngestor(online, consumer=consumer, producer=producer, config=StreamConfig())
    await asyncio.wait_for(ingestor.run(stop), 10)
    assert consumer.polls == 3 and not producer.sent
