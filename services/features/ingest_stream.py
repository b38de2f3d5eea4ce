"""Streaming ingestion: a Kafka consumer that upserts feature updates (`python -m services.features.ingest_stream`).

Each record's value is a `WriteFeaturesRequest`, serialized protobuf or its JSON
form (`{"featureView": "user", "rows": [{"entityKey": {"user_id": {"stringValue":
"u1"}}, "values": {"txn_count_1h": {"floatValue": 2}}, "eventTimestamp":
"2026-01-01T00:00:00Z"}]}`). A batch of records is decoded and validated; the good
rows are written to the store (the newest event time wins, so replays are
harmless), the bad records go to the dead-letter topic with an `error` header,
and only then are the offsets committed. While the store is down the batch is
retried with backoff and nothing is committed.

A record is bad when it does not decode, names an unknown view or feature, or
fails the checks of WriteFeatures (types, event-time bounds, NaN/±Inf); a record
is dead-lettered whole, like a WriteFeatures call is refused whole. When the store
refuses a batch for something a record carries, the batch is written record by
record and the refused ones are dead-lettered. No record stops the consumer: an
unexpected error on one is logged and that record dead-lettered, never re-read in
a crash loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cassandra.cluster import NoHostAvailable
from confluent_kafka import KafkaError, KafkaException
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry import trace
from prometheus_client import Counter, Gauge

from infergrid.features.v1 import features_pb2
from libs.config import load_config_or_exit
from libs.errors import DeadlineExceeded, ServiceError, Unavailable, is_client_error
from libs.kafka import context_from_headers
from libs.telemetry import setup_telemetry, tracer
from services.features.config import ENV_PREFIX, FeaturesConfig, StreamConfig
from services.features.online import OnlineFeatures
from services.features.registry import View
from services.features.store import WriteRow
from services.features.wiring import open_feature_store

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

RECORDS = Counter(
    "infergrid_features_stream_records_total", "Feature update records consumed, by outcome.", ["outcome"]
)
CONSUMER_LAG = Gauge(
    "infergrid_features_stream_consumer_lag",
    "Feature update records not yet consumed, summed over the partitions assigned to this ingester "
    "(the autoscaling signal).",
)
_LAG_EVERY_S = 5.0
_MAX_LINKS = 128
_WRITTEN = RECORDS.labels("written")
_DEAD = RECORDS.labels("dead_letter")


class Message(Protocol):
    """The part of confluent_kafka.Message the ingestor uses."""

    def value(self) -> bytes | None: ...
    def key(self) -> bytes | None: ...
    def headers(self) -> list[tuple[str, bytes]] | None: ...
    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def error(self) -> Any: ...


@dataclass
class BatchOutcome:
    written_rows: int = 0
    dead_lettered: int = 0


def decode(payload: bytes | None) -> features_pb2.WriteFeaturesRequest:
    """A WriteFeaturesRequest from protobuf bytes or its JSON form.

    Raises:
        ValueError: The payload is neither (the message says why).
    """
    if not payload:
        raise ValueError("empty record")
    request = features_pb2.WriteFeaturesRequest()
    try:
        if payload.lstrip()[:1] == b"{":
            json_format.Parse(payload.decode(), request)
        else:
            request.ParseFromString(payload)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a WriteFeaturesRequest: {str(exc)[:300]}") from None
    if not request.feature_view:
        raise ValueError("feature_view is empty")
    return request


class StreamIngestor:
    """Consumes feature updates in batches: write, dead-letter, then commit."""

    def __init__(self, online: OnlineFeatures, consumer: Any, producer: Any, config: StreamConfig) -> None:
        self._online = online
        self._consumer = consumer
        self._producer = producer
        self._config = config

    def _dead_letter(self, message: Message, reason: str, outcome: BatchOutcome) -> None:
        headers = list(message.headers() or [])
        headers += [
            ("error", reason.encode()),
            ("source.topic", (message.topic() or "").encode()),
            ("source.partition", str(message.partition()).encode()),
            ("source.offset", str(message.offset()).encode()),
        ]
        self._producer.produce(
            self._config.stream_dead_letter_topic, value=message.value(), key=message.key(), headers=headers
        )
        _DEAD.inc()
        outcome.dead_lettered += 1
        log.warning("record %s dead-lettered: %s", _where(message), reason)

    async def process(self, messages: Sequence[Message], stop: asyncio.Event | None = None) -> BatchOutcome:
        """Writes the good records of a batch and dead-letters the bad ones (offsets are not touched)."""
        outcome = BatchOutcome()
        by_view: dict[str, tuple[View, list[tuple[Message, list[WriteRow]]]]] = {}
        # The batch span links to the traces of the producers that sent its records.
        links = [
            trace.Link(ctx)
            for ctx in (
                trace.get_current_span(context_from_headers(m.headers())).get_span_context() for m in messages
            )
            if ctx.is_valid
        ]
        with _tracer.start_as_current_span("ingest batch", links=links[:_MAX_LINKS]) as span:
            span.set_attribute("messaging.batch.message_count", len(messages))
            try:
                await self._online.registry.refresh_if_older(5.0)
            except ServiceError as exc:
                log.warning("feature views could not be re-read: %s", exc)
            for message in messages:
                if message.error() is not None:
                    log.warning("consumer error: %s", message.error())
                    continue
                try:
                    request = decode(message.value())
                    view, rows = self._online.prepare(request.feature_view, request.rows)
                except (ValueError, ServiceError) as exc:
                    self._dead_letter(message, str(getattr(exc, "message", exc)), outcome)
                    continue
                except Exception:  # one record must never stop (and crash-loop) the consumer
                    log.exception("record %s: unexpected error", _where(message))
                    self._dead_letter(message, "internal error while validating the record", outcome)
                    continue
                by_view.setdefault(view.name, (view, []))[1].append((message, rows))
            for view, records in by_view.values():
                await self._write_records(view, records, outcome, stop)
            _WRITTEN.inc(outcome.written_rows)
            if outcome.dead_lettered:
                await asyncio.to_thread(self._producer.flush, 30)
        return outcome

    async def _write_records(
        self,
        view: View,
        records: list[tuple[Message, list[WriteRow]]],
        outcome: BatchOutcome,
        stop: asyncio.Event | None,
    ) -> None:
        """Writes the records' rows in one call; when the store refuses them, record by record."""
        rows = [row for _, record_rows in records for row in record_rows]
        try:
            await self._write_until_done(view, rows, stop)
        except (Unavailable, DeadlineExceeded):
            raise
        except Exception as exc:
            if len(records) == 1:
                self._refused(records[0][0], exc, outcome)
                return
            log.warning("the store refused a batch of %d records, writing them one by one", len(records))
            for record in records:
                await self._write_records(view, [record], outcome, stop)
            return
        outcome.written_rows += len(rows)

    def _refused(self, message: Message, exc: Exception, outcome: BatchOutcome) -> None:
        """Dead-letters a record the store refused: the store's reason when it blames the record."""
        if is_client_error(exc):
            self._dead_letter(message, str(getattr(exc, "message", exc)), outcome)
            return
        log.error("record %s: the store failed on it", _where(message), exc_info=exc)
        self._dead_letter(message, "internal error while writing the record", outcome)

    async def _write_until_done(self, view: View, rows: list[WriteRow], stop: asyncio.Event | None) -> None:
        delay = 0.2
        while True:
            try:
                await self._online.write(view, rows)
                return
            except (Unavailable, DeadlineExceeded) as exc:
                if stop is not None and stop.is_set():
                    raise
                log.warning("store unavailable, retrying the batch in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def run(self, stop: asyncio.Event) -> None:
        """Consumes until `stop` is set; commits each batch after its writes."""
        self._consumer.subscribe([self._config.stream_topic])
        log.info("consuming %s as %s", self._config.stream_topic, self._config.stream_group_id)
        loop = asyncio.get_running_loop()
        lag_due = 0.0
        while not stop.is_set():
            if loop.time() >= lag_due:
                lag_due = loop.time() + _LAG_EVERY_S
                await asyncio.to_thread(self._update_lag)
            messages = await asyncio.to_thread(
                self._consumer.consume, self._config.stream_batch_size, self._config.stream_poll_timeout_s
            )
            if not messages:
                continue
            try:
                await self.process(messages, stop)
            except (Unavailable, DeadlineExceeded):
                break  # stopping while the store is down: leave the batch uncommitted
            try:
                await asyncio.to_thread(self._consumer.commit, asynchronous=False)
            except KafkaException as exc:
                # A poll that returned only error events (the topic not created yet) stored no offset.
                if exc.args[0].code() != KafkaError._NO_OFFSET:
                    raise

    def _update_lag(self) -> None:
        """Sets the lag gauge: per assigned partition, the high watermark minus the position."""
        try:
            lag = 0
            for tp in self._consumer.position(self._consumer.assignment()):
                low, high = self._consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)
                if tp.offset >= 0:
                    lag += max(0, high - tp.offset)
                else:
                    committed = self._consumer.committed([tp], timeout=1.0)[0].offset
                    lag += max(0, high - max(committed, low))
        except Exception as exc:  # a measurement, never a reason to stop consuming
            log.debug("lag not measured: %s", exc)
            return
        CONSUMER_LAG.set(lag)


def _where(message: Message) -> str:
    return f"{message.topic()}/{message.partition()}/{message.offset()}"


def consumer_conf(config: FeaturesConfig) -> dict[str, Any]:
    """librdkafka settings of the ingestion consumer: manual commits, start from the oldest record."""
    return {
        **config.kafka.client_conf(),
        "group.id": config.stream.stream_group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
    }


async def _main(config: FeaturesConfig) -> None:
    from confluent_kafka import Consumer, Producer

    features = open_feature_store(config)
    await features.open()
    await features.registry.refresh()
    consumer = Consumer(consumer_conf(config))
    producer = Producer({**config.kafka.client_conf(), "enable.idempotence": True})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await StreamIngestor(features.online, consumer, producer, config.stream).run(stop)
    finally:
        consumer.close()
        producer.flush(10)
        await features.close()


def main() -> None:
    config = load_config_or_exit(FeaturesConfig, os.environ, ENV_PREFIX)
    telemetry_config = dataclasses.replace(config.telemetry, metrics_port=config.stream.stream_metrics_port)
    telemetry = setup_telemetry("features-ingest", telemetry_config)
    try:
        asyncio.run(_main(config))
    except NoHostAvailable as exc:
        log.error("Cassandra cannot be reached: %s", exc)
        raise SystemExit(1) from None
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    main()
