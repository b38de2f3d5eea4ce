"""The inference-log consumer: Kafka → validation → Cassandra and the Parquet lake → offset commit.

One consumer-group member per process. All Kafka consumer calls run on one
dedicated thread (librdkafka's rebalance callbacks run there too, inside
`consume`); the asyncio loop awaits them, so the pipeline's state is only ever
touched by one thread at a time.

Per batch: every message is validated (invalid ones go to the dead-letter topic
with the reason in the `infergrid-dlq-reason` header); valid records are
deduplicated by (tenant, request_id) and upserted into Cassandra (retried until it
succeeds or the service stops) and, once Cassandra has them, buffered for the
lake. The Cassandra writes of up to `batch_writes_in_flight` batches (default 1) overlap the
fetching and validation of the next (so Cassandra is not idle while this process
validates); batches complete in order, so offsets only ever advance over records
the store holds. When the lake is due
(size or age) it writes its files, the dead-letter producer is flushed, and only
then are the offsets committed. A crash anywhere before the commit means
redelivery, which the sinks absorb (store: upserts by (tenant, request_id); lake: see
services/logging/lake.py), so every record lands exactly once in each sink.

A rebalance abandons the revoked partitions' uncommitted work (buffered lake
records are dropped, and so is the lake part of a batch whose store write was
in flight; the next owner consumes them again from the committed offset). SIGTERM finishes: the current batch completes, the lake is flushed,
offsets are committed, and the consumer leaves the group.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections import Counter as Tally
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from opentelemetry import trace

from infergrid.logging.v1 import logging_pb2
from libs.kafka import KafkaConfig, context_from_headers
from libs.telemetry import tracer
from services.logging import metrics
from services.logging.config import PipelineConfig
from services.logging.lake import FlushResult, ParquetLake
from services.logging.store import LogStore, StoredRecord
from services.logging.validation import InvalidRecord, validate

log = logging.getLogger(__name__)

DLQ_REASON_HEADER = "infergrid-dlq-reason"
DLQ_SOURCE_HEADER = "infergrid-dlq-source"
_LAG_EVERY_S = 5.0
_RETRY_MAX_S = 5.0


@dataclass
class PipelineStats:
    """Counts since the consumer started (GetStats)."""

    records_by_model: Tally[str] = field(default_factory=Tally)
    records_total: int = 0
    dead_lettered_total: int = 0
    consumer_lag: int = 0


class _Valid(NamedTuple):
    """A valid record of a batch (a tuple: built once per record)."""

    partition: int
    offset: int
    value: bytes
    headers: list[tuple[str, bytes | None]]
    record: logging_pb2.InferenceLogRecord
    time_us: int  # request_time in microseconds


@dataclass
class _Batch:
    """Valid records of one consumed batch, the offsets it advances to, and the partitions' epochs then."""

    items: list[_Valid]
    offsets: dict[int, int]
    epochs: dict[int, int]
    write: asyncio.Task[bool] | None = None
    started_ns: int = 0


def _headers(message: Message) -> list[tuple[str, bytes | None]]:
    raw = message.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return [(k, v.encode() if isinstance(v, str) else v) for k, v in pairs]


def ensure_topics(kafka: KafkaConfig, config: PipelineConfig, timeout: float = 30.0) -> None:
    """Creates the topic and the dead-letter topic when missing (blocking; start-up only)."""
    admin = AdminClient(kafka.client_conf())
    existing = admin.list_topics(timeout=timeout).topics
    topic_config: dict[str, str] = {}
    if config.topic_min_insync_replicas:
        topic_config["min.insync.replicas"] = str(config.topic_min_insync_replicas)
    wanted = [
        NewTopic(
            name,
            num_partitions=config.topic_partitions,
            replication_factor=config.topic_replication,
            config=topic_config,
        )
        for name in (config.topic, config.dead_letter_topic)
        if name not in existing
    ]
    if not wanted:
        return
    for name, future in admin.create_topics(wanted, operation_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
            log.info("created topic %s", name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def _sampled(traceparent: bytes | None) -> bool:
    """True when a W3C traceparent's flags have the sampled bit (flags may carry others, e.g. random)."""
    if traceparent is None or len(traceparent) < 55:
        return False
    try:
        return bool(int(traceparent[-2:], 16) & 1)
    except ValueError:
        return False


class LogPipeline:
    """Consumes the inference-log topic into the store and the lake (guarantees: module docstring)."""

    def __init__(
        self,
        config: PipelineConfig,
        kafka: KafkaConfig,
        store: LogStore,
        lake: ParquetLake,
        *,
        trace_records: bool = False,
    ) -> None:
        """Builds the pipeline; `start()` begins consuming."""
        self.config = config
        self.stats = PipelineStats()
        self._store = store
        self._lake = lake
        self._trace_records = trace_records
        self._tracer = tracer(__name__)
        self._consumer_conf: dict[str, Any] = {
            **kafka.client_conf(),
            "group.id": config.consumer_group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            "max.poll.interval.ms": config.max_poll_interval_ms,
            "session.timeout.ms": config.session_timeout_ms,
            "logger": log,
        }
        self._dlq = Producer(
            {**kafka.client_conf(), "enable.idempotence": True, "acks": "all", "linger.ms": 5, "logger": log}
        )
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="logging-consumer")
        self._consumer: Consumer | None = None
        self._pending: dict[int, int] = {}  # partition -> next offset to commit
        self._unreconciled: set[int] = set()
        self._epochs: dict[int, int] = {}  # partition -> revocations so far
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_lag = 0.0
        self._last_commit = time.monotonic()
        self.running = False

    # Lifecycle.

    def start(self) -> None:
        """Starts consuming in a task on the running loop."""
        self._task = asyncio.create_task(self._run(), name="logging-pipeline")

    async def stop(self) -> None:
        """Finishes the current batch, flushes the lake, commits and leaves the group."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._thread.shutdown(wait=True)

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def _run(self) -> None:
        self._consumer = await self._call(self._create_consumer)
        self.running = True
        # Batches whose store write is under way, oldest first: they complete in this order.
        in_flight: collections.deque[_Batch] = collections.deque()
        depth = self.config.batch_writes_in_flight
        try:
            while not self._stopping.is_set():
                # The store writes of the batches in flight proceed while the next is fetched and validated.
                messages = await self._call(
                    self._consumer.consume, self.config.batch_max_records, self.config.batch_wait_seconds
                )
                batch = self._prepare(messages) if messages else None
                # Completes the oldest batches first: enough to make room for this batch's write, or all
                # of them when there is none (nothing came: idle; or only dead letters, whose offsets
                # must not pass theirs).
                keep = depth - 1 if batch is not None and batch.items else 0
                while len(in_flight) > keep:
                    await self._complete(in_flight.popleft())
                if batch is not None:
                    if batch.items:
                        self._begin(batch)
                        in_flight.append(batch)
                    else:
                        self._apply_offsets(batch)
                if self._lake.due() or self._only_offsets_due():
                    await self._flush_and_commit()
                if time.monotonic() - self._last_lag >= _LAG_EVERY_S:
                    await self._call(self._update_lag)
            while in_flight:
                await self._complete(in_flight.popleft())
            await self._flush_and_commit()
        except Exception:
            log.exception("logging pipeline failed")
            raise
        finally:
            self.running = False
            await self._call(self._close_consumer)

    def _create_consumer(self) -> Consumer:
        consumer = Consumer(self._consumer_conf)
        consumer.subscribe([self.config.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        return consumer

    def _close_consumer(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        self._dlq.flush(10)

    # Rebalances (called on the consumer thread, inside consume(), while _run awaits it).

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        metrics.REBALANCES.labels("assigned").inc(len(partitions))
        self._unreconciled.update(tp.partition for tp in partitions)
        log.info("assigned partitions %s", [tp.partition for tp in partitions])

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        metrics.REBALANCES.labels("revoked").inc(len(partitions))
        revoked = [tp.partition for tp in partitions]
        self._lake.drop(revoked)
        for partition in revoked:
            # A batch still being written for this partition must not reach the lake or the offsets.
            self._epochs[partition] = self._epochs.get(partition, 0) + 1
            self._pending.pop(partition, None)
            self._unreconciled.discard(partition)
        log.info("revoked partitions %s; their uncommitted work is abandoned", revoked)

    # The batch.

    def _prepare(self, messages: Sequence[Message]) -> _Batch:
        """Validates a batch: dead-letters the invalid messages, deduplicates the valid ones by (tenant, request id)."""
        valid: dict[tuple[str, str], _Valid] = {}
        offsets: dict[int, int] = {}
        dead = 0
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", error.str())
                continue
            partition, offset = int(message.partition() or 0), int(message.offset() or 0)
            if partition in self._unreconciled:
                self._unreconciled.discard(partition)
                deleted = self._lake.reconcile(partition, offset)
                if deleted:
                    log.warning("partition %d: removed %d uncommitted lake files", partition, len(deleted))
            offsets[partition] = offset + 1
            raw = message.headers()
            # A consumed message's headers come as a list of (str, bytes | None): used as they are.
            headers = cast(list[tuple[str, bytes | None]], raw) if type(raw) is list else _headers(message)
            value = message.value()
            try:
                record = validate(value if isinstance(value, bytes) else None, headers)
            except InvalidRecord as exc:
                self._dead_letter(message, headers, exc.reason)
                dead += 1
                continue
            assert isinstance(value, bytes)
            time_us = record.request_time.ToMicroseconds()
            key = (record.tenant, record.request_id)
            known = valid.get(key)
            # One (tenant, id) is one prediction: of two records, the later request time wins (as in the sinks).
            if known is None or time_us > known.time_us:
                valid[key] = _Valid(partition, offset, value, headers, record, time_us)
        metrics.BATCH_SIZE.observe(len(messages))
        if dead:
            self.stats.dead_lettered_total += dead
            metrics.RECORDS.labels("dead_lettered").inc(dead)
        epochs = {p: self._epochs.get(p, 0) for p in offsets}
        return _Batch(list(valid.values()), offsets, epochs)

    def _begin(self, batch: _Batch) -> None:
        batch.started_ns = time.time_ns()
        batch.write = asyncio.create_task(self._write_store(batch.items))

    def _current(self, batch: _Batch, partition: int) -> bool:
        return self._epochs.get(partition, 0) == batch.epochs[partition]

    def _apply_offsets(self, batch: _Batch) -> None:
        for partition, offset in batch.offsets.items():
            if self._current(batch, partition):
                self._pending[partition] = offset

    async def _complete(self, batch: _Batch) -> None:
        """After the store has a batch: buffer it for the lake and advance the offsets to commit."""
        assert batch.write is not None
        if not await batch.write:
            return  # stopping while the store is down: abandoned; nothing of this batch is committed
        ended_ns = time.time_ns()
        if all(self._current(batch, p) for p in batch.offsets):
            items = batch.items
        else:
            items = [i for i in batch.items if self._current(batch, i.partition)]
        add = self._lake.add
        for item in items:
            add(item.partition, item.offset, item.record, item.value)
        self.stats.records_by_model.update(item.record.model for item in items)
        self._apply_offsets(batch)
        self.stats.records_total += len(items)
        metrics.RECORDS.labels("written").inc(len(items))
        if self._trace_records:
            self._trace(items, batch.started_ns, ended_ns)

    async def _write_store(self, items: list[_Valid]) -> bool:
        rows = [
            StoredRecord(r.tenant, r.request_id, r.model, r.model_version, i.time_us, i.value)
            for i in items
            for r in (i.record,)
        ]
        delay = 0.1
        while True:
            started = time.perf_counter()
            try:
                await self._store.write(rows)
                metrics.SINK_SECONDS.labels("cassandra").observe(time.perf_counter() - started)
                return True
            except Exception as exc:
                metrics.SINK_ERRORS.labels("cassandra").inc()
                log.warning("store write of %d records failed (retrying in %.1fs): %s", len(rows), delay, exc)
            if self._stopping.is_set():
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)

    def _trace(self, items: list[_Valid], started_ns: int, ended_ns: int) -> None:
        """One span per sampled record, a child of the producer's span: the trace ends at the sink write."""
        for item in items:
            traceparent = next((v for k, v in item.headers if k == "traceparent"), None)
            if not _sampled(traceparent):
                continue  # unsampled: a span would not be recorded anyway
            span = self._tracer.start_span(
                "inference_log sink write",
                context=context_from_headers(item.headers),
                kind=trace.SpanKind.CONSUMER,
                start_time=started_ns,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.destination.name": self.config.topic,
                    "messaging.kafka.partition": item.partition,
                    "messaging.kafka.offset": item.offset,
                    "infergrid.request_id": item.record.request_id,
                    "infergrid.model": item.record.model,
                    "db.system": "cassandra",
                },
            )
            span.end(end_time=ended_ns)

    def _dead_letter(self, message: Message, original: list[tuple[str, bytes | None]], reason: str) -> None:
        source = f"{message.topic()}/{message.partition()}/{message.offset()}"
        headers: list[tuple[str, str | bytes | None]] = [*original, (DLQ_REASON_HEADER, reason.encode())]
        headers.append((DLQ_SOURCE_HEADER, source.encode()))
        log.warning("dead-lettering %s: %s", source, reason)
        while True:
            try:
                self._dlq.produce(
                    self.config.dead_letter_topic, message.value(), message.key(), headers=headers
                )
                return
            except BufferError:
                self._dlq.poll(0.1)

    def _only_offsets_due(self) -> bool:
        """Offsets advanced with nothing for the lake (dead letters only): commit on the lake's schedule too."""
        return (
            bool(self._pending)
            and self._lake.buffered_bytes == 0
            and time.monotonic() - self._last_commit >= self.config.lake_roll_seconds
        )

    async def _flush_and_commit(self) -> None:
        if not self._pending:
            return
        started = time.perf_counter()
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, self._lake.flush)
        except OSError as exc:
            metrics.SINK_ERRORS.labels("parquet").inc()
            log.error(
                "lake flush failed; offsets stay uncommitted and the records will be redelivered: %s", exc
            )
            return
        metrics.SINK_SECONDS.labels("parquet").observe(time.perf_counter() - started)
        metrics.LAKE_FILES.inc(len(result.files))
        offsets = [TopicPartition(self.config.topic, p, o) for p, o in sorted(self._pending.items())]
        if await self._call(self._commit, offsets, result):
            self._pending.clear()
        self._last_commit = time.monotonic()

    def _commit(self, offsets: list[TopicPartition], result: FlushResult) -> bool:
        remaining = self._dlq.flush(30)
        if remaining:
            log.error("%d dead letters not acknowledged; offsets not committed", remaining)
            metrics.COMMITS.labels("failed").inc()
            return False
        assert self._consumer is not None
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # Left for the next owner: the flush's journals make it remove these files and consume again.
            log.warning("offset commit failed: %s", exc)
            metrics.COMMITS.labels("failed").inc()
            return False
        self._lake.committed(result)
        metrics.COMMITS.labels("ok").inc()
        return True

    def _update_lag(self) -> None:
        self._last_lag = time.monotonic()
        if self._consumer is None:
            return
        lag = 0
        try:
            for tp in self._consumer.position(self._consumer.assignment()):
                _low, high = self._consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)
                if tp.offset >= 0:
                    lag += max(0, high - tp.offset)
                else:
                    committed = self._consumer.committed([tp], timeout=1.0)[0].offset
                    lag += max(0, high - max(committed, _low))
        except KafkaException as exc:
            log.debug("lag not measured: %s", exc)
            return
        self.stats.consumer_lag = lag
        metrics.CONSUMER_LAG.set(lag)
