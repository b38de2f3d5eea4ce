"""Publisher process of the logging benchmark: `python -m bench.logpub BOOTSTRAP TOPIC SPOOL TAG COUNT`.

Publishes COUNT inference-log records (a gateway-like record: 24 features, 8 request inputs, one output)
through libs.inference_log.InferenceLogProducer as fast as it can, timing every publish() call (the
request-path cost), then flushes. Prints one JSON line: start time, publish-call percentiles, CPU
seconds of the whole process (librdkafka's threads included) per record, flush time, producer counters.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from bench.procs import publisher_kafka
from infergrid.logging.v1 import logging_pb2
from libs.inference_log import InferenceLogConfig, InferenceLogProducer

FEATURES = (
    [f"user:f{i:02d}" for i in range(12)]
    + [f"merchant:f{i:02d}" for i in range(8)]
    + [f"device:f{i:02d}" for i in range(4)]
)


def make_record(tag: str, i: int, now_us: int) -> logging_pb2.InferenceLogRecord:
    record = logging_pb2.InferenceLogRecord(
        schema_version=logging_pb2.SCHEMA_VERSION_1,
        request_id=f"{tag}-{i:08d}",
        tenant="acme",
        model="fraud",
        model_version="1",
        latency_us=900 + i % 500,
        status_code=0,
        trace_id=f"{i + 1:032x}",
        span_id=f"{i + 1:016x}",
    )
    record.request_time.FromMicroseconds(now_us)
    record.response_time.FromMicroseconds(now_us + 900)
    record.entities["user_id"] = f"u{i % 10_000:05d}"
    record.entities["merchant_id"] = f"m{i % 1000:04d}"
    record.entities["device_id"] = f"d{i % 5000:05d}"
    for j, name in enumerate(FEATURES):
        record.features[name].float_value = (i * 31 + j) % 97 / 7.0
    for j in range(8):
        record.request_inputs[f"in{j}"].float_value = float(j)
    record.outputs["fraud_probability"].float_value = (i % 100) / 100
    return record


def main(argv: list[str]) -> None:
    bootstrap, topic, spool, tag, count = argv[0], argv[1], argv[2], argv[3], int(argv[4])
    producer = InferenceLogProducer(
        InferenceLogConfig(inference_log_topic=topic, inference_log_spool_dir=Path(spool)),
        publisher_kafka(bootstrap),
    )
    producer.start()
    now_us = int(time.time() * 1e6)
    records = [make_record(tag, i, now_us) for i in range(count)]  # built before: the gateway has it already
    durations = [0] * count
    cpu0 = time.process_time()
    started = time.time()
    clock = time.perf_counter_ns
    for i, record in enumerate(records):
        t = clock()
        producer.publish(record)
        durations[i] = clock() - t
    publish_s = time.time() - started
    cpu_publish = time.process_time() - cpu0
    unflushed = producer.flush(120)
    flushed_at = time.time()
    cpu_total = time.process_time() - cpu0
    producer.close(timeout=30)
    durations.sort()

    def pct(q: float) -> float:
        return durations[min(count - 1, int(q / 100 * count))] / 1000

    print(json.dumps({
        "started": started, "flushed_at": flushed_at, "publish_s": publish_s, "unflushed": unflushed,
        "publish_us_p50": pct(50), "publish_us_p99": pct(99), "publish_us_p999": pct(99.9),
        "publish_us_mean": sum(durations) / count / 1000,
        "cpu_us_per_record_publish_loop": cpu_publish / count * 1e6,
        "cpu_us_per_record_incl_delivery": cpu_total / count * 1e6,
        "record_bytes": len(records[0].SerializeToString()),
        "stats": dataclasses.asdict(producer.stats()),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
