"""Nothing answered is lost when the producing process is SIGKILLed, with Kafka down or up (real Kafka).

The last test runs the logging service too: each answered record is then exactly once in Cassandra and
in the lake (read through `read_table`), duplicates in the topic notwithstanding.

A gateway-like process (`wal_publisher.py`: concurrent requests, each awaiting the group-committed
write-ahead log, then printing its request id — its "answer") is SIGKILLed mid-stream. A new process
on the same spool folder, with Kafka reachable, re-sends what the dead one left. Every id printed must
then be in the topic; duplicates (allowed: the sinks dedupe by request_id) are counted.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from inference_log_publisher import PUBLISHER_PREFIX
from logging_harness import (
    LoggingService,
    Run,
    wait_for_both_sinks,
)

from infergrid.logging.v1 import logging_pb2
from libs.testing import REPO_ROOT
from stack.kafka import Kafka, credential_env

pytestmark = pytest.mark.integration

HELPER = Path(__file__).with_name("wal_publisher.py")


class Publisher:
    """`wal_publisher.py` as a process; its stdout lines are collected by a thread."""

    def __init__(self, kafka: Kafka, topic: str, spool: Path, tag: str, count: int, *flags: str) -> None:
        paths = [str(Path(__file__).parent), str(REPO_ROOT), str(REPO_ROOT / "build" / "gen")]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(paths),
            **credential_env(kafka.config, "admin", PUBLISHER_PREFIX),
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HELPER),
                kafka.bootstrap_servers,
                topic,
                str(spool),
                tag,
                str(count),
                "16",
                *flags,
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=(spool.parent / f"publisher-{tag}-{time.monotonic_ns()}.log").open("wb"),
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def wait_for(self, predicate: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"the publisher exited ({self.proc.returncode}) before {what}")
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def answered(self) -> set[str]:
        return {line for line in self.lines if line not in ("READY",) and not line.startswith("DONE")}

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=10)  # what it printed before dying is still in the pipe

    def finish(self, timeout: float) -> dict[str, object]:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        done = [line for line in self.lines if line.startswith("DONE ")]
        assert self.proc.returncode == 0 and done, (
            f"publisher failed ({self.proc.returncode}): {self.lines[-5:]}"
        )
        stats: dict[str, object] = json.loads(done[0][5:])
        return stats


def _create_topic(kafka: Kafka, topic: str) -> None:
    admin = AdminClient(kafka.client_conf())
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(30)


def _topic_ids(kafka: Kafka, topic: str) -> collections.Counter[str]:
    """Every request id in the topic, with how many times it is there (read to the end of each partition)."""
    consumer = Consumer({**kafka.client_conf(), "group.id": uuid.uuid4().hex, "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        ids: collections.Counter[str] = collections.Counter()
        positions = dict.fromkeys(partitions, 0)
        deadline = time.monotonic() + 60
        while any(positions[p] < ends[p] for p in partitions):
            assert time.monotonic() < deadline, f"could not read the topic to its end: {positions} of {ends}"
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is None:
                    ids[logging_pb2.InferenceLogRecord.FromString(msg.value()).request_id] += 1
                    positions[msg.partition()] = msg.offset() + 1
        return ids
    finally:
        consumer.close()


def _kill_mid_stream_then_resend(
    kafka: Kafka, tmp_path: Path, *, kafka_down: bool
) -> tuple[set[str], collections.Counter[str], dict[str, object]]:
    tag = uuid.uuid4().hex[:8]
    topic, spool = f"wal-{tag}", tmp_path / "spool"
    _create_topic(kafka, topic)
    if kafka_down:
        kafka.stop()
    first = Publisher(kafka, topic, spool, tag, 1_000_000)
    first.wait_for(lambda: len(first.lines) > 1500, 120, "1,500 answered records")
    if not kafka_down:  # long enough for Kafka to acknowledge records and segments to be deleted
        time.sleep(4)
    first.kill()
    answered = first.answered()
    assert len(answered) > 1500
    if kafka_down:
        kafka.start()
    second = Publisher(kafka, topic, spool, f"{tag}b", 0, "--drain")
    stats = second.finish(timeout=180)
    assert stats["drained"], stats
    assert not list(spool.glob("segment-*.spool"))
    return answered, _topic_ids(kafka, topic), stats


def test_sigkill_during_a_kafka_outage_loses_no_answered_record(own_kafka: Kafka, tmp_path: Path) -> None:
    answered, in_topic, stats = _kill_mid_stream_then_resend(own_kafka, tmp_path, kafka_down=True)
    lost = answered - set(in_topic)
    duplicated = {i: n for i, n in in_topic.items() if n > 1}
    print(f"\nKafka down: answered {len(answered)}, in topic {len(in_topic)}, lost {len(lost)}, "
          f"duplicated {len(duplicated)}, re-sent by the next process {stats['resent']}")  # fmt: skip
    assert not lost, sorted(lost)[:10]
    # Kafka never acknowledged anything of the killed process: each record is re-sent exactly once.
    assert not duplicated
    assert stats["resent"] == len(in_topic) >= len(answered)


def test_sigkill_with_kafka_up_loses_no_answered_record(own_kafka: Kafka, tmp_path: Path) -> None:
    answered, in_topic, stats = _kill_mid_stream_then_resend(own_kafka, tmp_path, kafka_down=False)
    lost = answered - set(in_topic)
    duplicated = {i: n for i, n in in_topic.items() if n > 1}
    print(f"\nKafka up: answered {len(answered)}, in topic {len(in_topic)}, lost {len(lost)}, "
          f"duplicated {len(duplicated)}, re-sent by the next process {stats['resent']}")  # fmt: skip
    assert not lost, sorted(lost)[:10]
    # Only records of segments not yet deleted (about the last second) can be in the topic twice.
    assert max(duplicated.values(), default=1) <= 2
    assert len(duplicated) <= stats["resent"]  # type: ignore[operator]


def test_records_of_a_sigkilled_gateway_land_exactly_once_in_cassandra_and_the_lake(
    kafka_server: Kafka, cassandra_session: object, run: Run
) -> None:
    service = LoggingService(run, kafka_server, cassandra_session.cluster.port)  # type: ignore[attr-defined]
    service.start()  # creates the topic
    try:
        first = Publisher(kafka_server, run.topic, run.spool, run.tag, 1_000_000)
        first.wait_for(lambda: len(first.lines) > 1500, 120, "1,500 answered records")
        time.sleep(3)  # acknowledged records and deleted segments, and some not yet
        first.kill()
        answered = first.answered()
        second = Publisher(kafka_server, run.topic, run.spool, f"{run.tag}b", 0, "--drain")
        stats = second.finish(timeout=180)
        in_topic = _topic_ids(kafka_server, run.topic)
        duplicated = sum(1 for n in in_topic.values() if n > 1)
        print(f"\nsinks: answered {len(answered)}, in topic {len(in_topic)} ({duplicated} twice), "
              f"re-sent {stats['resent']}")  # fmt: skip
        assert answered <= set(in_topic)
        expected = set(in_topic)
        wait_for_both_sinks(cassandra_session, run, expected, "every record in both sinks", service)
    finally:
        service.stop()
