"""The stream ingestor's batch processing with in-memory fakes: writes, dead letters, retries while the store is down."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from infergrid.features.v1 import features_pb2 as pb
from services.features.config import FeaturesConfig, StreamConfig
from services.features.ingest_stream import StreamIngestor
from services.features.online import OnlineFeatures
from services.features.registry import Registry
from services.features.tests.fakes import InMemoryCache, InMemoryOnlineStore, InMemoryViewStore
from services.features.tests.views import V, typed_view


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


def _update(user: str, n: int, view: str = "v") -> bytes:
    return pb.WriteFeaturesRequest(
        feature_view=view,
        rows=[pb.FeatureRow(entity_key={"id": V(string_value=user)}, values={"f_int64": V(int64_value=n)})],
    ).SerializeToString()


async def test_good_records_are_written_and_bad_ones_dead_lettered() -> None:
    ingestor, store, producer, _ = await _ingestor()
    traceparent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    messages = [
        FakeMessage(_update("a", 1), 0, [("traceparent", traceparent)]),
        FakeMessage(b"\xff\xfe not protobuf", 1),
        FakeMessage(None, 2),
        FakeMessage(_update("a", 1, view="nope"), 3),
        FakeMessage(
            json.dumps(
                {
                    "featureView": "v",
                    "rows": [
                        {
                            "entityKey": {"id": {"stringValue": "b"}},
                            "values": {"f_int64": {"int64Value": "2"}},
                        }
                    ],
                }
            ).encode(),
            4,
        ),
        FakeMessage(
            json.dumps(
                {
                    "featureView": "v",
                    "rows": [
                        {"entityKey": {"id": {"int64Value": "1"}}, "values": {"f_int64": {"int64Value": "2"}}}
                    ],
                }
            ).encode(),
            5,
        ),
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
