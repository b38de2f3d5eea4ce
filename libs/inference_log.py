"""The inference-log producer: publishes InferenceLogRecords to Kafka off the request path, never losing one.

`InferenceLogProducer.publish(record)` serializes the record and hands it to
confluent-kafka's (librdkafka's) in-memory queue: a few microseconds, no I/O, no
waiting. A background thread serves delivery reports. A record that cannot be
queued (BufferError: the queue is full) or whose delivery fails (Kafka
unreachable past the delivery timeout, a fatal producer error, a purge at close)
is appended to an on-disk `Spool` instead; the same thread re-sends spooled
records once Kafka answers again, and replays what an earlier process left in
the spool at start-up. Re-sending can publish a record twice (a timed-out
delivery may still have landed); the consumer's sinks are idempotent by
request_id, so that costs nothing downstream.

Spool format: a folder of append-only segment files `segment-<seq>.spool`, each
a sequence of frames `MAGIC(4) | length(u32 LE) | crc32(length bytes + payload)(u32 LE) | payload`.
The payload is the Kafka message: key, headers and value. A process only ever
appends to a segment it created; segments left by an earlier process are only
read. A torn tail (a crash in the middle of a write) or a damaged frame fails its
length or checksum test and is skipped: the reader scans forward to the next
MAGIC that starts a valid frame, so one bad frame never hides the ones after it.
Writes go straight to the file descriptor (no user-space buffer), so a record in
the spool survives a crash of the process at once; `fsync` makes it survive a
crash of the machine too: after every write ("always"), at most every
`spool_fsync_interval_s` from the background thread ("interval", the default),
or when a segment is sealed or the producer closes ("never").
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from opentelemetry import trace
from prometheus_client import Counter, Gauge

from infergrid.logging.v1 import logging_pb2
from libs.kafka import KafkaConfig

log = logging.getLogger(__name__)

SCHEMA_VERSION_HEADER = "infergrid-schema-version"
TRACEPARENT_HEADER = "traceparent"
CURRENT_SCHEMA_VERSION = logging_pb2.SCHEMA_VERSION_1
_SCHEMA_VERSION_VALUE = str(int(CURRENT_SCHEMA_VERSION)).encode()

MAGIC = b"IGS1"
_FRAME = struct.Struct("<4sII")
_LENGTH = struct.Struct("<I")
_MESSAGE_HEAD = struct.Struct("<IH")
_HEADER_HEAD = struct.Struct("<HI")
MAX_FRAME_BYTES = 64 * 1024 * 1024
_SEGMENT_GLOB = "segment-*.spool"
_FSYNC_POLICIES = ("always", "interval", "never")

# Kafka record headers as confluent-kafka takes and gives them.
Headers = list[tuple[str, str | bytes | None]]

RECORDS = Counter(
    "infergrid_inference_log_records",
    "Inference-log records by outcome: sent (delivered first time), spooled (written to the disk spool), "
    "resent (delivered from the spool), failed (lost: the spool could not be written).",
    ["outcome"],
)
SPOOL_BYTES = Gauge("infergrid_inference_log_spool_bytes", "Bytes waiting in the inference-log disk spool.")
for _outcome in ("sent", "spooled", "resent", "failed"):
    RECORDS.labels(_outcome)


@dataclass(frozen=True)
class InferenceLogConfig:
    """Producer settings; read with the using service's prefix (e.g. INFERGRID_GATEWAY_INFERENCE_LOG_*)."""

    inference_log_topic: str = "infergrid.inference-log.v1"
    # One folder per producer process (the producer locks it): give each gateway worker its own.
    inference_log_spool_dir: Path = Path(".state/inference-log-spool")
    # Message key: "request_id" (spreads load; no per-model order) or "model" (per-model order).
    inference_log_key: str = "request_id"
    inference_log_compression: str = "lz4"
    inference_log_linger_ms: float = 5.0
    # librdkafka's in-memory queue; beyond it records go straight to the spool.
    inference_log_queue_max_messages: int = 200_000
    inference_log_queue_max_kbytes: int = 256 * 1024
    # A record not acknowledged within this time is spooled (and re-sent later).
    inference_log_delivery_timeout_ms: int = 10_000
    # "always" (fsync each write), "interval" (group fsync every interval) or "never" (at seal/close).
    inference_log_spool_fsync: str = "interval"
    inference_log_spool_fsync_interval_s: float = 0.2
    inference_log_spool_segment_bytes: int = 64 * 1024 * 1024
    # How often the spool is checked and, when Kafka answers, re-sent.
    inference_log_resend_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.inference_log_key not in ("request_id", "model"):
            raise ValueError(f"inference_log_key must be request_id or model, got {self.inference_log_key!r}")
        if self.inference_log_spool_fsync not in _FSYNC_POLICIES:
            raise ValueError(
                f"inference_log_spool_fsync must be one of {_FSYNC_POLICIES}, got {self.inference_log_spool_fsync!r}"
            )
        if not self.inference_log_topic:
            raise ValueError("inference_log_topic must not be empty")


@dataclass(frozen=True)
class SpooledMessage:
    """One Kafka message as kept in the spool."""

    key: bytes
    value: bytes
    headers: Headers


def encode_message(key: bytes, value: bytes, headers: Sequence[tuple[str, str | bytes | None]]) -> bytes:
    """The spool payload of a message: key length, header count, key, headers, value."""
    parts = [_MESSAGE_HEAD.pack(len(key), len(headers)), key]
    for name, raw in headers:
        name_bytes = name.encode()
        data = raw.encode() if isinstance(raw, str) else raw or b""
        parts.append(_HEADER_HEAD.pack(len(name_bytes), len(data)))
        parts.append(name_bytes)
        parts.append(data)
    parts.append(value)
    return b"".join(parts)


def decode_message(payload: bytes) -> SpooledMessage:
    """The inverse of `encode_message`; raises ValueError when the payload is malformed."""
    try:
        key_len, count = _MESSAGE_HEAD.unpack_from(payload, 0)
        pos = _MESSAGE_HEAD.size
        key = payload[pos : pos + key_len]
        pos += key_len
        headers: Headers = []
        for _ in range(count):
            name_len, data_len = _HEADER_HEAD.unpack_from(payload, pos)
            pos += _HEADER_HEAD.size
            name = payload[pos : pos + name_len].decode()
            pos += name_len
            headers.append((name, payload[pos : pos + data_len]))
            pos += data_len
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed spooled message: {exc}") from None
    if pos > len(payload):
        raise ValueError("malformed spooled message: truncated")
    return SpooledMessage(key=key, value=payload[pos:], headers=headers)


def frame(payload: bytes) -> bytes:
    """One spool frame: MAGIC, length, crc32 over length and payload, payload."""
    length = _LENGTH.pack(len(payload))
    return MAGIC + length + _LENGTH.pack(zlib.crc32(payload, zlib.crc32(length))) + payload


@dataclass
class ReadReport:
    """What reading a segment found besides the good frames."""

    frames: int = 0
    skipped_bytes: int = 0


def read_frames(data: bytes, report: ReadReport | None = None) -> Iterator[bytes]:
    """Yields the payload of every intact frame in `data`, skipping torn or damaged ones.

    A frame is intact when its MAGIC, length and checksum agree; otherwise the
    reader moves to the next MAGIC and tries again there.
    """
    report = report if report is not None else ReadReport()
    pos = 0
    end = len(data)
    while pos < end:
        if end - pos >= _FRAME.size:
            magic, length, crc = _FRAME.unpack_from(data, pos)
            start = pos + _FRAME.size
            if (
                magic == MAGIC
                and length <= MAX_FRAME_BYTES
                and start + length <= end
                and zlib.crc32(data[start : start + length], zlib.crc32(data[pos + 4 : pos + 8])) == crc
            ):
                report.frames += 1
                yield data[start : start + length]
                pos = start + length
                continue
        following = data.find(MAGIC, pos + 1)
        following = end if following < 0 else following
        report.skipped_bytes += following - pos
        pos = following


class SpoolLockedError(RuntimeError):
    """Another live process holds the spool folder."""


class Spool:
    """An append-only, crash-safe folder of segment files holding Kafka messages (format: module docstring)."""

    def __init__(
        self, directory: Path, *, fsync: str = "interval", segment_bytes: int = 64 * 1024 * 1024
    ) -> None:
        """Opens (creating) `directory` and locks it for this process.

        Raises:
            SpoolLockedError: another process uses the folder.
        """
        if fsync not in _FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {_FSYNC_POLICIES}, got {fsync!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._lock_file = (self.directory / "LOCK").open("a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SpoolLockedError(f"spool {self.directory} is in use by another process") from None
        existing = self._segments()
        self._next_seq = (int(existing[-1].stem.split("-")[1]) + 1) if existing else 1
        self._active: Path | None = None
        self._fd: int | None = None
        self._active_size = 0
        self._dirty = False

    def _segments(self) -> list[Path]:
        return sorted(self.directory.glob(_SEGMENT_GLOB))

    def append(self, key: bytes, value: bytes, headers: Sequence[tuple[str, str | bytes | None]]) -> None:
        """Appends one message; raises OSError (e.g. ENOSPC) when it cannot be written."""
        data = frame(encode_message(key, value, headers))
        with self._lock:
            if self._fd is None or self._active_size >= self._segment_bytes:
                self._open_segment_locked()
            assert self._fd is not None
            written = 0
            try:
                while written < len(data):
                    written += os.write(self._fd, data[written:])
            except OSError:
                # Cut a partial frame so the next append starts clean (the reader would skip it anyway).
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._active_size)
                raise
            self._active_size += len(data)
            if self._fsync == "always":
                os.fsync(self._fd)
            else:
                self._dirty = True

    def _open_segment_locked(self) -> None:
        self._seal_locked()
        path = self.directory / f"segment-{self._next_seq:012d}.spool"
        self._next_seq += 1
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._active = path
        self._active_size = 0
        _fsync_dir(self.directory)

    def _seal_locked(self) -> None:
        if self._fd is None:
            return
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        self._active = None
        self._active_size = 0
        self._dirty = False

    def sync(self) -> None:
        """Makes every appended message durable (the "interval" policy's periodic call).

        The fsync runs on a duplicate descriptor outside the lock, so appends from the request path
        never wait for the disk.
        """
        with self._lock:
            if self._fd is None or not self._dirty:
                return
            fd = os.dup(self._fd)
            self._dirty = False
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def seal(self) -> None:
        """Closes the active segment so it can be re-sent; the next append starts a new one."""
        with self._lock:
            self._seal_locked()

    def sealed_segments(self) -> list[Path]:
        """Segments no longer written to (this process's sealed ones and any earlier process's), oldest first."""
        with self._lock:
            return [p for p in self._segments() if p != self._active]

    def has_messages(self) -> bool:
        """True when any segment holds data."""
        with self._lock:
            return self._active_size > 0 or any(p != self._active for p in self._segments())

    def read(self, segment: Path, report: ReadReport | None = None) -> Iterator[SpooledMessage]:
        """The intact messages of a sealed segment, in order."""
        for payload in read_frames(segment.read_bytes(), report):
            try:
                yield decode_message(payload)
            except ValueError as exc:  # checksum matched but content is not ours: skip it
                log.error("spool %s: skipping a frame: %s", segment, exc)

    def remove(self, segment: Path) -> None:
        """Deletes a segment whose messages were all delivered."""
        segment.unlink(missing_ok=True)
        _fsync_dir(self.directory)

    def size_bytes(self) -> int:
        """Bytes in all segments."""
        total = 0
        for path in self._segments():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def close(self) -> None:
        """Seals the active segment (fsync) and releases the folder."""
        with self._lock:
            self._seal_locked()
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ProducerStats:
    """Counters of one producer since it started."""

    sent: int
    spooled: int
    resent: int
    failed: int
    spool_bytes: int
    queued: int


class InferenceLogProducer:
    """Publishes inference-log records without blocking; spools to disk what Kafka cannot take.

    Call `start()` once (it replays the spool), `publish()` per request, `close()` at shutdown.
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
            "on_delivery": self._on_delivery,
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
        self._sent = 0
        self._spooled = 0
        self._resent = 0
        self._failed = 0
        self._count_lock = threading.Lock()
        self._fatal = False
        self._last_delivery = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        SPOOL_BYTES.set(self._spool.size_bytes())

    # The request path.

    def publish(self, record: logging_pb2.InferenceLogRecord) -> None:
        """Queues `record` for Kafka (or spools it); never blocks on the network and never raises for Kafka."""
        value = record.SerializeToString()
        key = (record.request_id if self._key_by_request else record.model).encode()
        headers: Headers = [(SCHEMA_VERSION_HEADER, _SCHEMA_VERSION_VALUE)]
        traceparent = _traceparent(record)
        if traceparent is not None:
            headers.append((TRACEPARENT_HEADER, traceparent))
        try:
            self._producer.produce(self.topic, value, key, headers=headers)
        except (BufferError, KafkaException) as exc:
            self._spool_message(key, value, headers, str(exc) or type(exc).__name__)

    # Background work.

    def start(self) -> None:
        """Starts the delivery/re-send thread; spooled records of earlier processes are re-sent first."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="inference-log-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self.config.inference_log_resend_interval_s
        fsync_every = self.config.inference_log_spool_fsync_interval_s
        next_resend = 0.0
        next_fsync = time.monotonic() + fsync_every
        while not self._stopping.is_set():
            try:
                self._producer.poll(0.05)
                now = time.monotonic()
                if now >= next_fsync:
                    self._spool.sync()
                    next_fsync = now + fsync_every
                if self._fatal:
                    self._replace_producer()
                if now >= next_resend:
                    self._resend_spool()
                    SPOOL_BYTES.set(self._spool.size_bytes())
                    next_resend = time.monotonic() + interval
            except Exception:  # the thread must survive anything: it is the only one re-sending
                log.exception("inference-log background loop failed; continuing")
                time.sleep(0.5)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self._sent += 1  # only the background thread (poll/flush) runs callbacks
            self._last_delivery = time.monotonic()
            RECORDS.labels("sent").inc()
            return
        raw = msg.headers() or []
        headers: Headers = list(raw.items()) if isinstance(raw, dict) else list(raw)
        self._spool_message(msg.key() or b"", msg.value() or b"", headers, err.str())

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("inference-log producer fatal error, replacing the producer: %s", err.str())
            self._fatal = True
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            log.warning("inference-log producer: all brokers down; records will spool")

    def _replace_producer(self) -> None:
        """After a fatal (idempotence) error: spool what the old producer holds and start a new one."""
        old = self._producer
        self._producer = Producer(self._conf)
        self._fatal = False
        with contextlib.suppress(KafkaException):
            old.purge(in_queue=True, in_flight=True, blocking=False)
        old.flush(5.0)

    def _spool_message(
        self, key: bytes, value: bytes, headers: Sequence[tuple[str, str | bytes | None]], reason: str
    ) -> None:
        try:
            self._spool.append(key, value, headers)
        except OSError as exc:
            with self._count_lock:
                self._failed += 1
            RECORDS.labels("failed").inc()
            log.error(
                "inference-log record LOST: Kafka refused it (%s) and the spool %s cannot be written: %s",
                reason,
                self._spool.directory,
                exc,
            )
            return
        with self._count_lock:
            self._spooled += 1
        RECORDS.labels("spooled").inc()

    def _kafka_answers(self) -> bool:
        if time.monotonic() - self._last_delivery < 2.0:
            return True
        try:
            metadata = self._producer.list_topics(self.topic, timeout=2.0)
        except KafkaException:
            return False
        topic = metadata.topics.get(self.topic)
        return bool(metadata.brokers) and topic is not None and topic.error is None

    def _resend_spool(self) -> None:
        if not self._spool.has_messages() or not self._kafka_answers():
            return
        self._spool.seal()
        for segment in self._spool.sealed_segments():
            if self._stopping.is_set() or not self._resend_segment(segment):
                return

    def _resend_segment(self, segment: Path) -> bool:
        """Re-sends one segment; deletes it only when every message was acknowledged."""
        state = {"pending": 0, "failed": 0}

        def _resent(err: KafkaError | None, _msg: Message) -> None:
            state["pending"] -= 1
            if err is None:
                self._resent += 1
                RECORDS.labels("resent").inc()
            else:
                state["failed"] += 1

        report = ReadReport()
        for message in self._spool.read(segment, report):
            while True:
                try:
                    self._producer.produce(
                        self.topic, message.value, message.key, headers=message.headers, on_delivery=_resent
                    )
                    state["pending"] += 1
                    break
                except BufferError:
                    self._producer.poll(0.05)
                    if self._stopping.is_set() or state["failed"]:
                        return False
            if state["failed"]:
                return False
        if report.skipped_bytes:
            log.error("spool %s: skipped %d damaged bytes", segment, report.skipped_bytes)
        deadline = time.monotonic() + self.config.inference_log_delivery_timeout_ms / 1000 + 5
        while state["pending"] > 0 and time.monotonic() < deadline and not self._stopping.is_set():
            self._producer.poll(0.05)
        if state["pending"] or state["failed"]:
            log.warning("re-sending %s: %d failed, %d unacknowledged; will retry", segment, *state.values())
            return False
        self._spool.remove(segment)
        log.info("re-sent spool segment %s (%d records)", segment.name, report.frames)
        return True

    # Inspection and shutdown.

    def stats(self) -> ProducerStats:
        """The counters since this producer started."""
        return ProducerStats(
            sent=self._sent,
            spooled=self._spooled,
            resent=self._resent,
            failed=self._failed,
            spool_bytes=self._spool.size_bytes(),
            queued=len(self._producer),
        )

    def flush(self, timeout: float = 10.0) -> int:
        """Waits for queued records to be delivered or spooled; returns how many are still queued."""
        return int(self._producer.flush(timeout))

    def drain_spool(self, timeout: float = 30.0) -> bool:
        """Waits until the spool is empty (everything re-sent); True when it is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._spool.has_messages() and len(self._producer) == 0:
                return True
            time.sleep(0.1)
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Stops the thread, delivers what it can within `timeout`, spools the rest and closes the spool."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        remaining = self._producer.flush(timeout)
        if remaining:
            with contextlib.suppress(KafkaException):
                self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.flush(1.0)  # runs the purge's delivery reports: they spool the records
        self._spool.close()
        SPOOL_BYTES.set(self._spool.size_bytes())


def _traceparent(record: logging_pb2.InferenceLogRecord) -> bytes | None:
    """The W3C traceparent of the current span, else of the record's trace_id/span_id (sampled)."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}".encode()
    if len(record.trace_id) == 32 and len(record.span_id) == 16:
        return f"00-{record.trace_id}-{record.span_id}-01".encode()
    return None
