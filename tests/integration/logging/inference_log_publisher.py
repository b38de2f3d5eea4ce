"""Test helper, run as a process: publishes inference-log records with libs.inference_log, then closes.

    python inference_log_publisher.py BOOTSTRAP TOPIC SPOOL_DIR TAG FIRST COUNT [DELIVERY_TIMEOUT_MS]

Kafka credentials come from `PUBLISHER_PREFIX` variables (`stack.kafka.credential_env(config, user,
PUBLISHER_PREFIX)`). Prints the producer's counters as one JSON line when done. `make_record` is also imported by the tests,
so both sides agree on every record's content.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from infergrid.logging.v1 import logging_pb2
from libs.config import load_config
from libs.kafka import KafkaConfig

BASE_US = 1_780_000_000_000_000
# The publishers' Kafka settings: <prefix>KAFKA_SASL_USERNAME, <prefix>KAFKA_SASL_PASSWORD_FILE, ...
PUBLISHER_PREFIX = "INFERGRID_TEST_PUBLISHER_"


def make_record(tag: str, i: int) -> logging_pb2.InferenceLogRecord:
    """Record `i` of a test run: every kind of field set, two models, times spread over hours."""
    record = logging_pb2.InferenceLogRecord(
        schema_version=logging_pb2.SCHEMA_VERSION_1,
        request_id=f"{tag}-{i:06d}",
        tenant="acme",
        model="fraud" if i % 3 else "churn",
        model_version=str(1 + i % 2),
        latency_us=100 + i,
        status_code=0,
        degraded=i % 7 == 0,
        cached=i % 5 == 0,
        trace_id=f"{i + 1:032x}",
        span_id=f"{i + 1:016x}",
    )
    record.request_time.FromMicroseconds(BASE_US + i * 1_000_000)
    record.response_time.FromMicroseconds(BASE_US + i * 1_000_000 + 100 + i)
    record.entities["user"] = f"user-{i}"
    record.features["user:age"].double_value = 20.0 + i % 50
    record.features["user:country"].string_value = "FR"
    record.features["user:history"].float_list_value.values.extend([0.5, 1.5])
    record.request_inputs["amount"].int64_value = i
    record.outputs["score"].float_value = (i % 100) / 100
    if record.degraded:
        record.degraded_features.append("user:history")
    if i == 5:  # one record larger than Cassandra's batch size limit (50 KiB)
        record.features["user:notes"].string_value = "x" * 100_000
    if i % 4 == 0:
        record.shadow.model_version = "3"
        record.shadow.outputs["score"].float_value = 0.5
        record.shadow.latency_us = 90
    return record


def kafka_config(bootstrap: str) -> KafkaConfig:
    """Kafka at `bootstrap`, as the user in the PUBLISHER_PREFIX variables (`stack.kafka.credential_env`)."""
    return load_config(
        KafkaConfig, {**os.environ, f"{PUBLISHER_PREFIX}KAFKA_BOOTSTRAP_SERVERS": bootstrap}, PUBLISHER_PREFIX
    )


def main(argv: list[str]) -> None:
    from libs.inference_log import InferenceLogConfig, InferenceLogProducer

    bootstrap, topic, spool, tag, first, count = argv[:6]
    timeout_ms = int(argv[6]) if len(argv) > 6 else 10_000
    producer = InferenceLogProducer(
        InferenceLogConfig(
            inference_log_topic=topic,
            inference_log_spool_dir=Path(spool),
            inference_log_delivery_timeout_ms=timeout_ms,
            inference_log_resend_interval_s=0.5,
        ),
        kafka_config(bootstrap),
    )
    producer.start()
    for i in range(int(first), int(first) + int(count)):
        producer.publish(make_record(tag, i))
    producer.close(timeout=timeout_ms / 1000 + 2)
    print(json.dumps(dataclasses.asdict(producer.stats())), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
