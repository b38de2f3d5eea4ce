"""The inference-log producer: a write-ahead log on local disk, then Kafka; nothing answered is lost.

Every record is appended to a write-ahead log (WAL) in the spool folder *before*
the prediction it describes is answered, then produced to Kafka. The gateway
awaits `InferenceLogProducer.write(record)`: records of concurrent requests that
arrive in the same event-loop turn, or while a write is in flight, form one group,
and each group is one `write()` system call (group commit). The write runs inline
on the event loop by default — a write() into the page cache takes microseconds,
and handing it to a thread cost more than it saved (figures: bench/results/code-figures.md)
— or on a writer
thread (`write_in_thread`, always with `spool_fsync=always`, whose fsync blocks),
for disks slow enough that a write() can stall. `publish(record)` is the same
path for synchronous callers (one write per record). A background thread serves Kafka's delivery
reports and counts acknowledgements per WAL segment; a segment that is sealed
(by size, or after `spool_segment_seconds`) and whose records Kafka has ALL
acknowledged is deleted. A record Kafka refuses (queue full) or fails to deliver
(unreachable past the delivery timeout, a fatal producer error, a purge at
close) is already on disk: it is remembered by its offset and re-sent, from the
WAL, once Kafka answers again. At start-up every segment an earlier process left
is re-sent whole: its acknowledgements died with that process.

Why the WAL and not "answer after the broker acknowledges": a SIGKILL cannot
lose what reached the kernel with write(), so the WAL makes an answered record
survive the death of the process at the cost of one write() per group
(microseconds, see bench/results/code-figures.md), and keeps answering, durably, while Kafka is
down. Waiting for the broker's acknowledgement (acks=all, linger) would add a
network round trip plus the linger and the replication to every answer
(milliseconds), and during a Kafka outage would turn every prediction into an
error (or a wait until the delivery timeout) instead of spooling.

Durability trade-off (`spool_fsync`): write() puts the record in the page cache,
which survives the death of the process (SIGKILL, OOM kill, a crash) but not of
the machine (power loss, kernel panic). "interval" (the default) fsyncs at most
every `spool_fsync_interval_s` from the background thread, so a machine crash
can lose that window; "always" fsyncs each group before the answer (a machine
crash loses nothing acknowledged to a caller; costs a disk flush, ~0.1-10 ms,
per group); "never" fsyncs only when a segment is sealed or the producer closes.

Duplicates: a restart re-sends the un-acknowledged segments of the dead process,
which may hold records Kafka already had (acknowledged, but their segment not
yet deleted: at most about `spool_segment_seconds` of traffic), and a timed-out
delivery may still have landed. The consumer's sinks are idempotent by
request_id (Cassandra upserts; the lake's reader deduplicates, see
services/logging/lake.py point 4), so each record lands exactly once in each.

Poison records: a record Kafka refuses for good (too large for the topic, an invalid record: the
non-retriable errors in `PERMANENT_ERRORS`) would otherwise be re-sent forever and keep its segment,
and a refusal raised while re-sending would stop the re-send of every record after it. Such a record
is re-sent once more alone (by a producer that puts one record per batch: a broker refuses a whole
batch, so the other records of a batch that held a poison record fail with it and must not be
condemned with it); refused again, it goes to the quarantine file `quarantine.spool` in the spool
folder (the same crc-framed format, with the reason in an `infergrid-quarantine-reason` header; never
re-sent), counted (`infergrid_inference_log_records{outcome="quarantined"}`) and logged as an error
that names the error and the size but no content of the record. It then counts as done for its
segment, which is deleted as usual, and the re-send moves on. A record refused for good by the
client itself (larger than librdkafka's `message.max.bytes`) is quarantined at once.

The write-ahead log is `libs/spool.py` (its format is described there).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future as ThreadFuture
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from opentelemetry import trace
from prometheus_client import Counter, Gauge

from infergrid.logging.v1 import logging_pb2
from libs.config import Bounded, setting
from libs.kafka import KafkaConfig
from libs.spool import (
    FSYNC_POLICIES,
    Headers,
    ReadReport,
    SegmentState,
    Spool,
    SpooledMessage,
    decode_message,
    encode_message,
    frame_at,
    iter_frames,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION_HEADER = "infergrid-schema-version"
TRACEPARENT_HEADER = "traceparent"
CURRENT_SCHEMA_VERSION = logging_pb2.SCHEMA_VERSION_1
_SCHEMA_VERSION_VALUE = str(int(CURRENT_SCHEMA_VERSION)).encode()

QUARANTINE_REASON_HEADER = "infergrid-quarantine-reason"
# Errors that re-sending the same record cannot cure (Kafka's non-retriable per-record errors).
PERMANENT_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        KafkaError._BAD_MSG,
        KafkaError._INVALID_ARG,
    }
)

# Refusals of the producer's credentials or rights: a configuration error that no re-send cures until an
# operator fixes the password or the ACLs. Loud (an error log, at most every CONFIG_ERROR_LOG_S, and
# `infergrid_inference_log_config_errors_total`), and never a reason to drop a record: they stay spooled.
CONFIG_ERRORS = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError._AUTHENTICATION,
    }
)
CONFIG_ERROR_LOG_S = 10.0

# One record ready for the WAL and Kafka: key, value, headers.
EncodedRecord = tuple[bytes, bytes, Headers]

RECORDS = Counter(
    "infergrid_inference_log_records",
    "Inference-log records by outcome: written (appended to the write-ahead log before the answer), "
    "sent (acknowledged by Kafka on the first attempt), spooled (refused or not delivered at first: kept "
    "in the log for re-sending), resent (acknowledged after a re-send), write_failed (the log could not "
    "be written: the request was refused), failed (lost: neither written nor delivered), quarantined "
    "(refused by Kafka for good: kept in the spool's quarantine file, never re-sent).",
    ["outcome"],
)
CONFIG_ERROR_COUNT = Counter(
    "infergrid_inference_log_config_errors",
    "Kafka refused the inference-log producer's credentials or authorization (a configuration error; the "
    "records stay in the write-ahead log until it is fixed), by Kafka error.",
    ["error"],
)
SPOOL_BYTES = Gauge(
    "infergrid_inference_log_spool_bytes", "Bytes in the inference-log write-ahead log (the disk spool)."
)
OUTCOMES = ("written", "sent", "spooled", "resent", "write_failed", "failed", "quarantined")
for _outcome in OUTCOMES:
    RECORDS.labels(_outcome)


@dataclass(frozen=True)
class InferenceLogConfig(Bounded):
    """Producer settings; read with the using service's prefix (e.g. INFERGRID_GATEWAY_INFERENCE_LOG_*)."""

    inference_log_topic: str = "infergrid.inference-log.v1"
    # One folder per producer process (the producer locks it): give each gateway worker its own.
    inference_log_spool_dir: Path = Path(".state/inference-log-spool")
    # Message key: "request_id" (spreads load; no per-model order) or "model" (per-model order).
    inference_log_key: str = setting("request_id", choices=("request_id", "model"))
    inference_log_compression: str = "lz4"
    inference_log_linger_ms: float = 5.0
    # librdkafka's in-memory queue; records beyond it wait in the write-ahead log for a re-send.
    inference_log_queue_max_messages: int = 200_000
    inference_log_queue_max_kbytes: int = 256 * 1024
    # A record not acknowledged within this time is re-sent later from the write-ahead log.
    inference_log_delivery_timeout_ms: int = 10_000
    # "always" (fsync each group write: survives a machine crash), "interval" (fsync every interval:
    # survives a process crash at once, a machine crash but the last interval) or "never" (at seal/close).
    inference_log_spool_fsync: str = setting("interval", choices=FSYNC_POLICIES)
    inference_log_spool_fsync_interval_s: float = 0.2
    inference_log_spool_segment_bytes: int = 64 * 1024 * 1024
    # A segment is sealed after this long, then deleted once Kafka acknowledged all its records: bounds
    # what a restart after a SIGKILL re-sends twice (and the disk used) to about this much traffic.
    inference_log_spool_segment_seconds: float = setting(1.0, positive=True)
    # Group writes on a writer thread (for slow disks: the loop never waits for one); false: inline on the
    # event loop (cheaper: bench/results/code-figures.md). "always" fsync runs on the writer thread regardless.
    inference_log_write_in_thread: bool = False
    # How often failed records are re-sent when Kafka answers again.
    inference_log_resend_interval_s: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.inference_log_topic:
            raise ValueError("inference_log_topic must not be empty")


@dataclass(frozen=True)
class ProducerStats:
    """Counters of one producer since it started."""

    sent: int
    spooled: int
    resent: int
    failed: int
    spool_bytes: int
    queued: int
    written: int = 0
    write_failed: int = 0
    quarantined: int = 0


class InferenceLogProducer:
    """Writes inference-log records ahead to disk, then to Kafka (see the module docstring).

    Call `start()` once (it re-sends what earlier processes left), `await write(record)` (or
    `publish(record)`) per request, `close()` at shutdown.
    """

    def __init__(
        self,
        config: InferenceLogConfig,
        kafka: KafkaConfig,
        *,
        extra_conf: dict[str, Any] | None = None,
    ) -> None:
        """Creates the Kafka producer and opens the spool (locking its folder).

        Args:
            config: Topic, spool and tuning settings.
            kafka: Where Kafka is.
            extra_conf: librdkafka settings that override the computed ones (tests, tuning).
        """
        self.config = config
        self.topic = config.inference_log_topic
        self._key_by_request = config.inference_log_key == "request_id"
        self._conf: dict[str, Any] = {
            **kafka.client_conf(),
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": config.inference_log_compression,
            "linger.ms": config.inference_log_linger_ms,
            "queue.buffering.max.messages": config.inference_log_queue_max_messages,
            "queue.buffering.max.kbytes": config.inference_log_queue_max_kbytes,
            "message.timeout.ms": config.inference_log_delivery_timeout_ms,
            "error_cb": self._on_error,
            "logger": log,
            **(extra_conf or {}),
        }
        self._spool = Spool(
            config.inference_log_spool_dir,
            fsync=config.inference_log_spool_fsync,
            segment_bytes=config.inference_log_spool_segment_bytes,
        )
        self._producer = Producer(self._conf)
        self._counts = dict.fromkeys(OUTCOMES, 0)  # by outcome, as in RECORDS
        # One record per batch: re-sends a record refused for good alone, so only a poison record fails.
        self._alone: Producer | None = None
        # Guards the counters and every SegmentState (delivery reports may run on two threads).
        self._count_lock = threading.Lock()
        self._fatal = False
        self._config_error_logged = -CONFIG_ERROR_LOG_S
        self._last_delivery = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Group commit (`write`): records waiting for the next group write, and whether one is running.
        self._group: list[EncodedRecord] = []
        self._group_futures: list[asyncio.Future[None]] = []
        self._group_busy = False
        self._group_scheduled = False
        # An fsync per group must never block the event loop, whatever the setting.
        in_thread = config.inference_log_write_in_thread or config.inference_log_spool_fsync == "always"
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="inference-log-writer") if in_thread else None
        SPOOL_BYTES.set(self._spool.size_bytes())

    # The request path.

    def encode(self, record: logging_pb2.InferenceLogRecord) -> EncodedRecord:
        """The record as a Kafka message; the traceparent header comes from the current span."""
        value = record.SerializeToString()
        key = (record.request_id if self._key_by_request else record.model).encode()
        headers: Headers = [(SCHEMA_VERSION_HEADER, _SCHEMA_VERSION_VALUE)]
        traceparent = _traceparent(record)
        if traceparent is not None:
            headers.append((TRACEPARENT_HEADER, traceparent))
        return key, value, headers

    async def write(self, record: logging_pb2.InferenceLogRecord) -> None:
        """Writes `record` ahead to disk, then queues it for Kafka; returns once the write returned.

        Records of callers that arrive in the same event-loop turn, or while a group write is in
        flight, go to disk together in the next group write (group commit): one write() per group.

        Raises:
            OSError: the write-ahead log could not be written (e.g. disk full): the record is neither
                on disk nor queued, and the caller must not answer as if it were.
        """
        message = self.encode(record)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._group.append(message)
        self._group_futures.append(future)
        if not self._group_busy and not self._group_scheduled:
            self._group_scheduled = True
            # Runs after every other callback already ready in this turn: their records join the group.
            loop.call_soon(self._write_group, loop)
        await future

    def _write_group(self, loop: asyncio.AbstractEventLoop) -> None:
        self._group_scheduled = False
        messages, futures = self._group, self._group_futures
        if not messages:
            return
        self._group, self._group_futures = [], []
        self._group_busy = True
        if self._writer is None:
            error: BaseException | None = None
            try:
                self.write_batch(messages)
            except Exception as exc:
                error = exc
            self._group_written(loop, futures, error)
            return

        def _written(done: ThreadFuture[None]) -> None:  # on the writer thread
            with contextlib.suppress(RuntimeError):  # the loop is closed (shutdown)
                loop.call_soon_threadsafe(self._group_written, loop, futures, done.exception())

        try:
            submitted = self._writer.submit(self.write_batch, messages)
        except RuntimeError:  # the writer was shut down (close)
            self._group_written(loop, futures, OSError("the inference-log producer is closed"))
            return
        submitted.add_done_callback(_written)

    def _group_written(
        self,
        loop: asyncio.AbstractEventLoop,
        futures: list[asyncio.Future[None]],
        error: BaseException | None,
    ) -> None:
        self._group_busy = False
        for future in futures:
            if future.done():  # its caller was cancelled; the record is written anyway
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        if self._group:  # what arrived during the write goes now, as one group
            self._write_group(loop)

    def write_batch(self, messages: Sequence[EncodedRecord]) -> None:
        """Appends `messages` to the write-ahead log with one write(), then queues each for Kafka.

        Raises:
            OSError: the log could not be written; nothing was queued.
        """
        try:
            state, offsets = self._spool.append_payloads([encode_message(k, v, h) for k, v, h in messages])
        except OSError as exc:
            self._count("write_failed", len(messages))
            log.error(
                "inference-log write-ahead log %s cannot be written (%s): %d records refused",
                self._spool.directory,
                exc,
                len(messages),
            )
            raise
        self._count("written", len(messages))
        for message, offset in zip(messages, offsets, strict=True):
            on_delivery = functools.partial(self._on_delivery, state, offset, False)
            self._produce(self._producer, state, offset, message, on_delivery, count=True)

    def _produce(
        self,
        producer: Producer,
        state: SegmentState,
        offset: int,
        message: EncodedRecord,
        on_delivery: Any,
        *,
        count: bool,
    ) -> None:
        """Queues a record the write-ahead log holds; refused, it waits there for a re-send (or quarantine)."""
        key, value, headers = message
        try:
            producer.produce(self.topic, value, key, headers=headers, on_delivery=on_delivery)
        except KafkaException as exc:
            if _permanent(exc.args[0]):  # refused by the client itself (e.g. over message.max.bytes)
                self._quarantine(state, message, exc.args[0])
            else:
                self._keep(state, offset, count=count)
        except BufferError:
            self._keep(state, offset, count=count)  # on disk already: re-sent when Kafka takes it

    def publish(self, record: logging_pb2.InferenceLogRecord) -> None:
        """Writes `record` ahead to disk and queues it for Kafka (synchronous callers); never raises.

        When the write-ahead log cannot be written the record still goes to Kafka from memory (and is
        spooled again if that fails); `write()` refuses instead.
        """
        message = self.encode(record)
        try:
            self.write_batch([message])
        except OSError:
            key, value, headers = message
            try:
                self._producer.produce(
                    self.topic, value, key, headers=headers, on_delivery=self._on_unwritten
                )
            except (KafkaException, BufferError) as exc:
                if isinstance(exc, KafkaException) and _permanent(exc.args[0]):
                    self._quarantine(None, message, exc.args[0])
                else:
                    self._spool_message(message, str(exc) or type(exc).__name__)

    # Delivery reports (on whichever thread polls: the background thread, flush or close).

    def _on_delivery(
        self, state: SegmentState, offset: int, resend: bool, err: KafkaError | None, msg: Message
    ) -> None:
        if err is not None and _permanent(err):
            # Maybe only a batch-mate was the poison: once more alone (below), then quarantined.
            self._count("spooled" if not resend else None, retry=state.alone, offsets=[offset])
            return
        if err is not None:
            self._config_error(err)
            self._keep(state, offset, count=not resend)
            return
        self._last_delivery = time.monotonic()
        self._count("resent" if resend else "sent", done=state)

    def _keep(self, state: SegmentState, offset: int, *, count: bool) -> None:
        """Marks a written record for re-sending."""
        self._count("spooled" if count else None, retry=state.failed, offsets=[offset])

    def _count(
        self,
        outcome: str | None,
        n: int = 1,
        *,
        done: SegmentState | None = None,
        retry: list[int] | None = None,
        offsets: Sequence[int] = (),
    ) -> None:
        """Counts `n` records of `outcome` (None: none), one more `done` in a segment, `offsets` to `retry`."""
        with self._count_lock:
            if outcome is not None:
                self._counts[outcome] += n
            if done is not None:
                done.acked += 1
            if retry is not None:
                retry.extend(offsets)
        if outcome is not None:
            RECORDS.labels(outcome).inc(n)

    def _on_unwritten(self, err: KafkaError | None, msg: Message) -> None:
        """Delivery report of a record that only Kafka's queue held (its write-ahead write failed)."""
        if err is None:
            self._last_delivery = time.monotonic()
            self._count("sent")
            return
        raw = msg.headers() or []
        headers: Headers = list(raw.items()) if isinstance(raw, dict) else list(raw)
        # A permanent refusal goes to the spool too: its re-send alone decides whether it is poison.
        self._spool_message((msg.key() or b"", msg.value() or b"", headers), err.str())

    def _on_alone(
        self, state: SegmentState, offset: int, message: SpooledMessage, err: KafkaError | None, _: Message
    ) -> None:
        """Delivery report of a record re-sent alone after a permanent refusal in a batch."""
        if err is None:
            self._on_delivery(state, offset, True, None, _)
        elif _permanent(err):
            self._quarantine(state, message, err)
        else:
            self._keep(state, offset, count=False)

    def _quarantine(self, state: SegmentState | None, message: EncodedRecord, err: KafkaError) -> None:
        """Moves a record Kafka refused for good to the quarantine file; its segment can then go."""
        key, value, headers = message
        reason = f"{err.name()}: {err.str()}"[:500]
        try:
            path = self._spool.quarantine(
                encode_message(key, value, [*headers, (QUARANTINE_REASON_HEADER, reason)])
            )
        except OSError as exc:
            self._count("failed", done=state)
            log.error(
                "inference-log record LOST: Kafka refused it for good (%s) and the quarantine file cannot "
                "be written: %s",
                err.name(),
                exc,
            )
            return
        self._count("quarantined", done=state)  # nothing left to deliver for it: its segment may go
        # The error and the size only: the record may hold what callers sent (entities, inputs).
        log.error(
            "inference-log record quarantined: Kafka refused it for good (%s, %d bytes); kept in %s, "
            "never re-sent",
            err.name(),
            len(value),
            path,
        )

    def _spool_message(self, message: EncodedRecord, reason: str) -> None:
        try:
            state, (offset,) = self._spool.append_payloads([encode_message(*message)])
        except OSError as exc:
            self._count("failed")
            log.error(
                "inference-log record LOST: Kafka refused it (%s) and the spool %s cannot be written: %s",
                reason,
                self._spool.directory,
                exc,
            )
            return
        self._keep(state, offset, count=True)

    def _config_error(self, err: KafkaError) -> None:
        """Counts and logs (rate-limited) a refusal of the producer's credentials or rights."""
        if err.code() not in CONFIG_ERRORS:
            return
        CONFIG_ERROR_COUNT.labels(err.name()).inc()
        now = time.monotonic()
        if now - self._config_error_logged >= CONFIG_ERROR_LOG_S:
            self._config_error_logged = now
            log.error(
                "inference-log producer refused by Kafka (%s: %s): check its user, password and ACLs; "
                "records stay in the write-ahead log %s until Kafka takes them",
                err.name(),
                err.str(),
                self._spool.directory,
            )

    def _on_error(self, err: KafkaError) -> None:
        self._config_error(err)
        if err.fatal():
            log.error("inference-log producer fatal error, replacing the producer: %s", err.str())
            self._fatal = True
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            log.warning("inference-log producer: all brokers down; records wait in the write-ahead log")

    # Background work.

    def start(self) -> None:
        """Starts the delivery/re-send thread; the segments of earlier processes are re-sent first."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="inference-log-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self.config.inference_log_resend_interval_s
        fsync_every = self.config.inference_log_spool_fsync_interval_s
        roll_after = self.config.inference_log_spool_segment_seconds
        next_resend = 0.0
        next_fsync = time.monotonic() + fsync_every
        while not self._stopping.is_set():
            try:
                self._producer.poll(0.05)
                if self._alone is not None:
                    self._alone.poll(0)
                now = time.monotonic()
                if now >= next_fsync:
                    self._spool.sync()
                    next_fsync = now + fsync_every
                if self._fatal:
                    self._replace_producer()
                self._spool.roll(roll_after)
                self._collect()
                if now >= next_resend:
                    self._resend()
                    SPOOL_BYTES.set(self._spool.size_bytes())
                    next_resend = time.monotonic() + interval
            except Exception:  # the thread must survive anything: it is the only one re-sending
                log.exception("inference-log background loop failed; continuing")
                time.sleep(0.5)

    def _replace_producer(self) -> None:
        """After a fatal (idempotence) error: the old producer's records fail (they re-send), a new one starts."""
        old = self._producer
        self._producer = Producer(self._conf)
        self._fatal = False
        with contextlib.suppress(KafkaException):
            old.purge(in_queue=True, in_flight=True, blocking=False)
        old.flush(5.0)

    def _collect(self) -> None:
        """Deletes the segments whose records Kafka has all acknowledged (or that were quarantined)."""
        for state in self._spool.states():
            with self._count_lock:
                done = state.done and not state.failed and not state.alone
            if done:
                self._spool.remove(state.path)

    def _kafka_answers(self) -> bool:
        if time.monotonic() - self._last_delivery < 2.0:
            return True
        try:
            metadata = self._producer.list_topics(self.topic, timeout=2.0)
        except KafkaException:
            return False
        topic = metadata.topics.get(self.topic)
        return bool(metadata.brokers) and topic is not None and topic.error is None

    def _resend(self) -> None:
        """Re-sends failed records and earlier processes' segments, once Kafka answers."""
        states = self._spool.states()
        if not any(s.failed or s.alone or not s.loaded for s in states) or not self._kafka_answers():
            return
        if any(s.failed and not s.sealed for s in states):
            self._spool.seal()  # the active segment has records to re-send: re-send from a sealed file
        for state in states:
            if self._stopping.is_set():
                return
            if state.sealed and (state.failed or not state.loaded):
                self._resend_segment(state)
            if state.alone:
                self._resend_alone(state)

    def _resend_segment(self, state: SegmentState) -> None:
        try:
            data = state.path.read_bytes()
        except FileNotFoundError:
            return
        with self._count_lock:
            if not state.loaded:  # an earlier process's segment: every intact record goes again
                report = ReadReport()
                state.failed = [offset for offset, _ in iter_frames(data, report)]
                state.written = len(state.failed)
                state.loaded = True
                if report.skipped_bytes:
                    log.error("spool %s: skipped %d damaged bytes", state.path, report.skipped_bytes)
                log.info(
                    "re-sending %d records an earlier process left in %s", state.written, state.path.name
                )
            todo, state.failed = sorted(state.failed), []
        for i, offset in enumerate(todo):
            message = self._message_at(state, data, offset)
            if message is None:
                continue
            on_delivery = functools.partial(self._on_delivery, state, offset, True)
            while True:
                try:
                    self._producer.produce(
                        self.topic,
                        message.value,
                        message.key,
                        headers=message.headers,
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    self._producer.poll(0.05)
                    if self._stopping.is_set():
                        self._count(None, retry=state.failed, offsets=todo[i:])
                        return
                except KafkaException as exc:
                    if _permanent(exc.args[0]):  # this record is the poison: the ones after it still go
                        self._quarantine(state, message, exc.args[0])
                        break
                    self._count(None, retry=state.failed, offsets=todo[i:])
                    return

    def _message_at(self, state: SegmentState, data: bytes, offset: int) -> SpooledMessage | None:
        """The message at `offset` of a segment's bytes; None (and counted as done) when it is damaged."""
        payload = frame_at(data, offset)
        try:
            if payload is None:
                raise ValueError(f"no intact frame at offset {offset}")
            return decode_message(payload)
        except ValueError as exc:
            log.error("spool %s: a record cannot be re-sent and is dropped: %s", state.path, exc)
            self._count(None, done=state)  # nothing left to deliver for it
            return None

    def _resend_alone(self, state: SegmentState) -> None:
        """Re-sends the records refused for good in a batch, each in a batch of its own."""
        try:
            data = state.path.read_bytes()
        except FileNotFoundError:
            return
        if self._alone is None:
            self._alone = Producer({**self._conf, "batch.num.messages": 1, "linger.ms": 0})
        with self._count_lock:
            todo, state.alone = sorted(state.alone), []
        for offset in todo:
            message = self._message_at(state, data, offset)
            if message is None:
                continue
            on_delivery = functools.partial(self._on_alone, state, offset, message)
            self._produce(self._alone, state, offset, message, on_delivery, count=False)

    # Inspection and shutdown.

    def stats(self) -> ProducerStats:
        """The counters since this producer started."""
        return ProducerStats(spool_bytes=self._spool.size_bytes(), queued=len(self._producer), **self._counts)

    def flush(self, timeout: float = 10.0) -> int:
        """Waits for queued records to be acknowledged or failed; returns how many are still queued."""
        return int(self._producer.flush(timeout))

    def drain_spool(self, timeout: float = 30.0) -> bool:
        """Waits until the spool is empty (everything acknowledged, segments deleted); True when it is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._spool.has_messages() and len(self._producer) == 0:
                return True
            time.sleep(0.1)
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Stops the threads, delivers what it can within `timeout` and closes the spool.

        What Kafka did not acknowledge stays in the write-ahead log for the next process.
        """
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._alone is not None:
            self._alone.flush(timeout)
        remaining = self._producer.flush(timeout)
        if remaining:
            with contextlib.suppress(KafkaException):
                self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.flush(1.0)  # runs the purge's delivery reports
        self._spool.seal()
        self._collect()
        self._spool.close()
        SPOOL_BYTES.set(self._spool.size_bytes())


def _permanent(err: object) -> bool:
    """True for a Kafka error that re-sending the same record cannot cure (`PERMANENT_ERRORS`)."""
    return isinstance(err, KafkaError) and err.code() in PERMANENT_ERRORS


def _traceparent(record: logging_pb2.InferenceLogRecord) -> bytes | None:
    """The W3C traceparent of the current span, else of the record's trace_id/span_id (sampled)."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}".encode()
    if len(record.trace_id) == 32 and len(record.span_id) == 16:
        return f"00-{record.trace_id}-{record.span_id}-01".encode()
    return None
