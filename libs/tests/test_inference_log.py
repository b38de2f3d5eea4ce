"""The inference-log producer's spool (frames, torn tails, checksums, locking) and its spill/re-send loop.

Kafka here is librdkafka's in-process mock cluster (`test.mock.num.brokers`) or an address nobody
listens on; the tests against a real broker are in tests/integration/logging/.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Message, Producer

from infergrid.logging.v1 import logging_pb2
from libs.inference_log import (
    QUARANTINE_REASON_HEADER,
    SCHEMA_VERSION_HEADER,
    InferenceLogConfig,
    InferenceLogProducer,
)
from libs.kafka import KafkaConfig
from libs.spool import (
    MAGIC,
    ReadReport,
    Spool,
    SpoolLockedError,
    decode_message,
    encode_message,
    frame,
    read_frames,
)
from libs.testing import free_port


def _record(i: int) -> logging_pb2.InferenceLogRecord:
    record = logging_pb2.InferenceLogRecord(
        schema_version=logging_pb2.SCHEMA_VERSION_1,
        request_id=f"req-{i:06d}",
        model="fraud",
        model_version="1",
        latency_us=100 + i,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        span_id="b7ad6b7169203331",
    )
    record.request_time.FromMicroseconds(1_780_000_000_000_000 + i)
    record.entities["user"] = f"u{i}"
    return record


def test_message_encoding_round_trips_key_headers_and_value() -> None:
    headers = [("traceparent", b"00-abc-def-01"), ("empty", b"")]
    message = decode_message(encode_message(b"key", b"\x00value\xff", headers))
    assert message.key == b"key"
    assert message.value == b"\x00value\xff"
    assert message.headers == headers


def test_frames_survive_a_torn_tail() -> None:
    data = frame(b"one") + frame(b"two") + frame(b"three")[:-2]
    report = ReadReport()
    assert list(read_frames(data, report)) == [b"one", b"two"]
    assert report.frames == 2
    assert report.skipped_bytes > 0


def test_a_damaged_frame_is_skipped_and_the_next_ones_are_read() -> None:
    damaged = bytearray(frame(b"payload-two"))
    damaged[-1] ^= 0xFF  # flip bits in the payload: the checksum no longer matches
    data = frame(b"one") + bytes(damaged) + frame(b"three")
    assert list(read_frames(data)) == [b"one", b"three"]


def test_a_damaged_length_does_not_swallow_the_following_frames() -> None:
    damaged = bytearray(frame(b"payload-two"))
    damaged[4:8] = (10_000_000).to_bytes(4, "little")
    data = frame(b"one") + bytes(damaged) + frame(b"three") + b"garbage" + MAGIC
    assert list(read_frames(data)) == [b"one", b"three"]


def _sealed(spool: Spool) -> list[Path]:
    """The segments no longer written to (this process's sealed ones and any earlier process's)."""
    return [state.path for state in spool.states() if state.sealed]


def test_spool_appends_seals_and_reads_back_after_a_torn_write(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync="always")
    for i in range(3):
        spool.append(f"k{i}".encode(), f"v{i}".encode(), [("h", b"x")])
    spool.close()
    (segment,) = sorted(tmp_path.glob("segment-*.spool"))
    with segment.open("ab") as handle:  # a crash in the middle of the next write
        handle.write(frame(encode_message(b"k3", b"v3", []))[:9])

    reopened = Spool(tmp_path)
    reopened.append(b"k4", b"v4", [])  # goes to a new segment: old ones are never appended to
    assert _sealed(reopened) == [segment]
    report = ReadReport()
    assert [m.value for m in reopened.read(segment, report)] == [b"v0", b"v1", b"v2"]
    assert report.skipped_bytes == 9
    reopened.seal()
    assert len(_sealed(reopened)) == 2
    for sealed in _sealed(reopened):
        reopened.remove(sealed)
    assert not reopened.has_messages()
    reopened.close()


def test_spool_folder_is_locked_by_one_process(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(SpoolLockedError):
        Spool(tmp_path)
    spool.close()
    Spool(tmp_path).close()


def test_spool_rolls_segments_by_size(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=100)
    for i in range(10):
        spool.append(b"k", b"x" * 60, [("n", str(i).encode())])
    spool.seal()
    segments = _sealed(spool)
    assert len(segments) == 5
    values = [m.headers[0][1] for s in segments for m in spool.read(s)]
    assert values == [str(i).encode() for i in range(10)]
    spool.close()


def _config(tmp_path: Path, **overrides: object) -> InferenceLogConfig:
    settings: dict[str, object] = {
        "inference_log_topic": "inference-log-test",
        "inference_log_spool_dir": tmp_path / "spool",
        "inference_log_delivery_timeout_ms": 1500,
        "inference_log_resend_interval_s": 0.2,
        "inference_log_linger_ms": 1.0,
        **overrides,
    }
    return InferenceLogConfig(**settings)  # type: ignore[arg-type]


def _wait(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture
def kafka() -> Iterator[KafkaConfig]:
    """A librdkafka mock cluster, kept alive by a producer for the test."""
    holder = Producer({"test.mock.num.brokers": 1})
    (broker,) = holder.list_topics(timeout=5).brokers.values()
    yield KafkaConfig(kafka_bootstrap_servers=f"{broker.host}:{broker.port}")
    del holder


def _consume_all(kafka: KafkaConfig, expected: int, timeout: float = 20.0) -> list[Message]:
    consumer = Consumer(
        {
            "bootstrap.servers": kafka.kafka_bootstrap_servers,
            "group.id": "test",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe(["inference-log-test"])
    seen: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < expected and time.monotonic() < deadline:
            seen.extend(msg for msg in consumer.consume(1000, 0.5) if msg.error() is None)
    finally:
        consumer.close()
    return seen


def _ids(messages: list[Message]) -> list[str]:
    return [logging_pb2.InferenceLogRecord.FromString(m.value()).request_id for m in messages]


def _no_space(fd: int, data: bytes) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _resent_by_a_new_producer(tmp_path: Path, kafka: KafkaConfig, count: int) -> set[str]:
    """Starts a producer on the spool, waits until it re-sent `count` records and drained; the ids Kafka has."""
    producer = InferenceLogProducer(_config(tmp_path), kafka)
    producer.start()
    _wait(lambda: producer.stats().resent == count)
    assert producer.drain_spool(10)
    producer.close()
    return set(_ids(_consume_all(kafka, count, timeout=10)))


def test_publishes_with_key_and_headers_to_kafka(tmp_path: Path, kafka: KafkaConfig) -> None:
    producer = InferenceLogProducer(_config(tmp_path), kafka)
    producer.start()
    for i in range(50):
        producer.publish(_record(i))
    assert producer.flush(10) == 0
    producer.close()
    assert producer.stats().sent == 50
    assert producer.stats().spooled == 0

    messages = _consume_all(kafka, 1)
    assert messages
    message = messages[0]
    record = logging_pb2.InferenceLogRecord.FromString(message.value())
    assert message.key() == record.request_id.encode()
    headers = dict(message.headers())
    assert headers[SCHEMA_VERSION_HEADER] == b"1"
    assert headers["traceparent"] == f"00-{record.trace_id}-{record.span_id}-01".encode()


def test_unreachable_kafka_spools_then_a_new_process_resends_everything(
    tmp_path: Path, kafka: KafkaConfig
) -> None:
    dead = KafkaConfig(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    producer = InferenceLogProducer(_config(tmp_path), dead)
    producer.start()
    for i in range(200):
        producer.publish(_record(i))
    _wait(lambda: producer.stats().spooled == 200)
    producer.close(timeout=0.5)
    assert producer.stats().failed == 0
    assert producer.stats().sent == 0

    assert _resent_by_a_new_producer(tmp_path, kafka, 200) == {f"req-{i:06d}" for i in range(200)}
    assert not list((tmp_path / "spool").glob("segment-*.spool"))


def test_a_full_queue_spills_to_the_spool_without_blocking(tmp_path: Path) -> None:
    dead = KafkaConfig(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    producer = InferenceLogProducer(_config(tmp_path, inference_log_queue_max_messages=10), dead)
    for i in range(100):
        producer.publish(_record(i))
    assert producer.stats().spooled == 90  # queued: 10; the rest went straight to disk
    producer.close(timeout=0.1)
    assert producer.stats().spooled == 100  # close spools what is still queued


def test_a_full_disk_counts_failed_and_logs_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dead = KafkaConfig(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    producer = InferenceLogProducer(_config(tmp_path, inference_log_queue_max_messages=1), dead)
    monkeypatch.setattr(os, "write", _no_space)
    producer.publish(_record(0))  # queued
    producer.publish(_record(1))  # queue full -> spool -> disk full
    monkeypatch.undo()
    assert producer.stats().failed == 1
    assert any(r.levelname == "ERROR" and "LOST" in r.getMessage() for r in caplog.records)
    producer.close(timeout=0.1)


def test_every_record_is_on_disk_when_write_returns_and_acknowledged_segments_are_deleted(
    tmp_path: Path, kafka: KafkaConfig
) -> None:
    producer = InferenceLogProducer(_config(tmp_path, inference_log_spool_segment_seconds=0.2), kafka)
    producer.start()
    for i in range(20):
        producer.publish(_record(i))
        # Before Kafka has it, the record is in the write-ahead log (what a SIGKILL leaves behind).
        segments = sorted((tmp_path / "spool").glob("segment-*.spool"))
        on_disk = {m.key for s in segments for m in Spool.read(producer._spool, s)}
        assert f"req-{i:06d}".encode() in on_disk
    assert producer.flush(10) == 0
    _wait(lambda: not list((tmp_path / "spool").glob("segment-*.spool")))  # sealed, all acked: deleted
    producer.close()
    stats = producer.stats()
    assert (stats.written, stats.sent, stats.spooled, stats.resent) == (20, 20, 0, 0)


@pytest.mark.parametrize("in_thread", [False, True], ids=["on-the-loop", "writer-thread"])
async def test_concurrent_writes_share_one_write_call_group_commit(
    tmp_path: Path, kafka: KafkaConfig, monkeypatch: pytest.MonkeyPatch, in_thread: bool
) -> None:
    producer = InferenceLogProducer(_config(tmp_path, inference_log_write_in_thread=in_thread), kafka)
    producer.start()
    calls: list[int] = []
    real_write = os.write

    def _counting_write(fd: int, data: bytes) -> int:
        calls.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", _counting_write)
    await asyncio.gather(*(producer.write(_record(i)) for i in range(64)))
    monkeypatch.undo()
    assert len(calls) == 1  # 64 concurrent requests, one write() system call
    assert producer.stats().written == 64
    await asyncio.to_thread(producer.close)
    assert producer.stats().sent == 64


async def test_write_raises_and_queues_nothing_when_the_disk_is_full(
    tmp_path: Path, kafka: KafkaConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer = InferenceLogProducer(_config(tmp_path, inference_log_write_in_thread=False), kafka)
    monkeypatch.setattr(os, "write", _no_space)
    with pytest.raises(OSError, match="No space"):
        await producer.write(_record(0))
    monkeypatch.undo()
    await producer.write(_record(1))
    assert producer.flush(10) == 0
    producer.close()
    stats = producer.stats()
    assert (stats.write_failed, stats.written, stats.sent) == (1, 1, 1)  # record 0 was never produced


def test_only_the_records_kafka_refused_are_re_sent(tmp_path: Path, kafka: KafkaConfig) -> None:
    producer = InferenceLogProducer(_config(tmp_path, inference_log_queue_max_messages=10), kafka)
    for i in range(100):  # not started: nothing polls, so the queue holds 10 and refuses 90
        producer.publish(_record(i))
    assert producer.stats().spooled == 90
    producer.start()
    _wait(lambda: producer.stats().resent == 90)
    assert producer.drain_spool(10)
    producer.close()
    ids = _ids(_consume_all(kafka, 100, timeout=10))
    assert sorted(ids) == [f"req-{i:06d}" for i in range(100)]  # each once: the acknowledged 10 not again


def test_a_segment_an_earlier_process_left_unacknowledged_is_re_sent_whole(
    tmp_path: Path, kafka: KafkaConfig
) -> None:
    # What a SIGKILLed producer leaves: written records, acknowledgements unknown.
    spool = Spool(tmp_path / "spool")
    for i in range(30):
        record = _record(i)
        spool.append(record.request_id.encode(), record.SerializeToString(), [(SCHEMA_VERSION_HEADER, b"1")])
    with (tmp_path / "spool" / "segment-000000000001.spool").open("ab") as handle:
        handle.write(frame(b"torn")[:7])  # the write the kill interrupted
    del spool  # no close(): the lock goes with the file object, like with the process
    assert _resent_by_a_new_producer(tmp_path, kafka, 30) == {f"req-{i:06d}" for i in range(30)}


def _poison(i: int, size: int) -> logging_pb2.InferenceLogRecord:
    record = _record(i)
    record.outputs["blob"].bytes_value = os.urandom(size)  # incompressible
    return record


def test_a_record_kafka_refuses_for_good_is_quarantined_and_the_others_go_on(
    tmp_path: Path, kafka: KafkaConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """Larger than the client's message.max.bytes: refused for good, quarantined at once, never re-sent."""
    # An earlier process left a segment holding a poison record between good ones: the re-send moves on.
    earlier = Spool(tmp_path / "spool")
    for message in (_record(0), _poison(1, 8000), _record(2)):
        earlier.append(message.request_id.encode(), message.SerializeToString(), [])
    earlier.close()
    producer = InferenceLogProducer(_config(tmp_path), kafka, extra_conf={"message.max.bytes": 4096})
    producer.start()
    producer.publish(_record(3))
    secret = _poison(4, 8000)
    producer.publish(secret)
    producer.publish(_record(5))
    _wait(lambda: producer.stats().quarantined == 2 and not producer._spool.has_messages())
    producer.close()
    stats = producer.stats()
    assert (stats.sent + stats.resent, stats.quarantined, stats.failed) == (4, 2, 0)
    ids = sorted(_ids(_consume_all(kafka, 4)))
    assert ids == [_record(i).request_id for i in (0, 2, 3, 5)]
    kept = list(Spool(tmp_path / "spool").quarantined())
    assert sorted(m.key for m in kept) == [b"req-000001", b"req-000004"]
    assert all(dict(m.headers)[QUARANTINE_REASON_HEADER].startswith(b"MSG_SIZE_TOO_LARGE") for m in kept)
    (live,) = [m for m in kept if m.key == b"req-000004"]
    assert logging_pb2.InferenceLogRecord.FromString(live.value) == secret
    errors = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(errors) == 2 and all(secret.request_id not in e for e in errors)
