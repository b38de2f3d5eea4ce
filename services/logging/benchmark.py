"""Informal benchmark of the inference-log pipeline: producer cost per record and publish → sink rate.

    python -m services.logging.benchmark --kafka 127.0.0.1:9092 --cassandra-port 9042 [--records 100000]

Runs against real Kafka and Cassandra (e.g. `make up`): publishes `--records` InferenceLogRecords with
libs.inference_log (timing `publish()` alone: the request-path cost), while this process also runs the
logging service's pipeline on a fresh topic, consumer group and lake; reports records per second from
the first publish until the last record is in Cassandra, and until it is in Parquet files. Prints one
JSON object. The producer and consumer share this process (and its GIL): a conservative set-up.
Kafka credentials come from the service's variables (INFERGRID_LOGGING_KAFKA_SASL_USERNAME,
INFERGRID_LOGGING_KAFKA_SASL_PASSWORD_FILE, ...): a user that may create topics (the stack's `admin`);
Cassandra's likewise (INFERGRID_LOGGING_CASSANDRA_USERNAME, ..._PASSWORD_FILE): a role that may create the
keyspace `logging_bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infergrid.logging.v1 import logging_pb2
from libs.cassandra import CassandraConfig
from libs.config import load_config
from libs.inference_log import InferenceLogConfig, InferenceLogProducer
from services.logging import metrics
from services.logging.config import (
    ENV_PREFIX,
    LoggingConfig,
    LoggingKafkaConfig,
    LoggingServerConfig,
    PipelineConfig,
)
from services.logging.lake import read_table
from services.logging.pipeline import ensure_topics
from services.logging.server import create_server

BASE_US = 1_780_000_000_000_000


def sample_record(tag: str, i: int) -> logging_pb2.InferenceLogRecord:
    """A typical record: 8 features, one output, ids and trace context (~330 bytes serialized)."""
    record = logging_pb2.InferenceLogRecord(
        schema_version=logging_pb2.SCHEMA_VERSION_1,
        request_id=f"{tag}-{i:09d}",
        tenant="bench",
        model="fraud",
        model_version="1",
        latency_us=1234,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        span_id="b7ad6b7169203331",
    )
    record.request_time.FromMicroseconds(BASE_US + i * 1000)
    record.response_time.FromMicroseconds(BASE_US + i * 1000 + 900)
    record.entities["user"] = f"user-{i}"
    for k in range(8):
        record.features[f"user:f{k}"].double_value = k * 0.5
    record.outputs["score"].float_value = 0.7
    return record


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the benchmark; returns the results."""
    tag = uuid.uuid4().hex[:8]
    work = Path(tempfile.mkdtemp(prefix="logging-bench-"))
    from_env = load_config(LoggingKafkaConfig, os.environ, ENV_PREFIX)
    kafka = dataclasses.replace(from_env, kafka_bootstrap_servers=args.kafka)
    pipeline = PipelineConfig(
        topic=f"bench-inference-log-{tag}",
        dead_letter_topic=f"bench-inference-log-{tag}.dlq",
        consumer_group=f"bench-{tag}",
        topic_partitions=args.partitions,
        lake_dir=work / "lake",
        lake_roll_seconds=args.lake_roll_seconds,
    )
    config = LoggingConfig(
        server=LoggingServerConfig(port=0),
        pipeline=pipeline,
        kafka=kafka,
        cassandra=dataclasses.replace(
            load_config(CassandraConfig, os.environ, ENV_PREFIX),
            cassandra_contact_points=(args.cassandra_host,),
            cassandra_port=args.cassandra_port,
            cassandra_keyspace="logging_bench",
            cassandra_write_consistency="ONE",
        ),
    )
    ensure_topics(kafka, pipeline)
    records = [sample_record(tag, i) for i in range(args.records)]
    written = metrics.RECORDS.labels("written")
    base = written._value.get()
    server = await create_server(config)
    await server.start()
    await asyncio.sleep(args.warmup_seconds)  # the consumer joins its group
    producer = InferenceLogProducer(
        InferenceLogConfig(inference_log_topic=pipeline.topic, inference_log_spool_dir=work / "spool"),
        kafka,
    )
    producer.start()
    started = time.perf_counter()
    cpu = time.process_time()
    for record in records:
        producer.publish(record)
    publish_s = time.perf_counter() - started
    publish_cpu_s = time.process_time() - cpu
    while written._value.get() - base < args.records:
        await asyncio.sleep(0.02)
    to_store_s = time.perf_counter() - started
    while read_table(pipeline.lake_dir, dedupe=False).num_rows < args.records:
        await asyncio.sleep(0.2)
    to_lake_s = time.perf_counter() - started
    producer.close()
    await server.stop(0, 1)
    load = os.getloadavg()
    sink_seconds = {
        sample.labels["sink"]: round(sample.value, 3)
        for family in metrics.SINK_SECONDS.collect()
        for sample in family.samples
        if sample.name.endswith("_sum")
    }
    return {
        "records": args.records,
        "record_bytes": len(records[0].SerializeToString()),
        "publish_us_per_record": round(publish_s / args.records * 1e6, 2),
        "publish_cpu_us_per_record": round(publish_cpu_s / args.records * 1e6, 2),
        "publish_to_cassandra_records_per_s": round(args.records / to_store_s),
        "publish_to_lake_records_per_s": round(args.records / to_lake_s),
        "lake_roll_seconds": args.lake_roll_seconds,
        "sink_write_seconds_total": sink_seconds,
        "producer": vars(producer.stats()),
        "cpus": os.cpu_count(),
        "load_average_1m": round(load[0], 2),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Parses the arguments, runs, prints the JSON result."""
    parser = argparse.ArgumentParser(
        prog="python -m services.logging.benchmark", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--kafka", default="127.0.0.1:9092")
    parser.add_argument("--cassandra-host", default="127.0.0.1")
    parser.add_argument("--cassandra-port", type=int, default=9042)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--lake-roll-seconds", type=float, default=2.0)
    parser.add_argument("--warmup-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
