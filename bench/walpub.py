"""Publisher process of the `logwal` suite: `python -m bench.walpub BOOTSTRAP TOPIC SPOOL MODE COUNT CONCURRENCY`.

Times what the request path pays per inference-log record, in one of these modes:

- `memory`: the pre-WAL path — serialize and hand to librdkafka's memory queue (what `publish()` was
  before the write-ahead log; a SIGKILL loses what is queued);
- `wal-sync`: `publish()` now — one write() per record to the write-ahead log, then librdkafka;
- `group-thread` / `group-loop`: what the gateway does — CONCURRENCY asyncio tasks (its concurrent
  requests) each `await producer.write(record)`; the records of a group share one write(), run on the
  writer thread or inline on the event loop;
- `group-thread-always`: group-thread with `spool_fsync=always` (an fsync per group before answering).

Prints one JSON line: latency per record of the call or await (µs percentiles), process CPU (all
threads, librdkafka's included, until every record was acknowledged) per record, records/s, and for
the WAL modes the number of write() calls (records per write = the group size).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient, NewTopic

from bench.logpub import make_record
from bench.procs import publisher_kafka
from libs.inference_log import InferenceLogConfig, InferenceLogProducer


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000


def main(argv: list[str]) -> None:
    bootstrap, topic, spool, mode, count, concurrency = (
        argv[0],
        argv[1],
        argv[2],
        argv[3],
        int(argv[4]),
        int(argv[5]),
    )
    kafka = publisher_kafka(bootstrap)
    admin = AdminClient(kafka.client_conf())
    for future in admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)]).values():
        with contextlib.suppress(Exception):  # it exists already
            future.result(30)
    producer = InferenceLogProducer(
        InferenceLogConfig(
            inference_log_topic=topic,
            inference_log_spool_dir=Path(spool),
            inference_log_write_in_thread=mode != "group-loop",
            inference_log_spool_fsync="always" if mode == "group-thread-always" else "interval",
        ),
        kafka,
    )
    producer.start()
    writes = 0
    real_append = producer._spool.append_payloads

    def _counting_append(payloads: Any) -> Any:
        nonlocal writes
        writes += 1
        return real_append(payloads)

    producer._spool.append_payloads = _counting_append  # type: ignore[method-assign]
    kafka = producer._producer  # the librdkafka producer: the pre-WAL path produced to it directly

    def _memory_publish(record: Any) -> None:
        key, value, headers = producer.encode(record)
        kafka.produce(topic, value, key, headers=headers, on_delivery=_ignore)

    now_us = int(time.time() * 1e6)
    records = [make_record("w", i, now_us) for i in range(count)]
    for record in records[:200]:  # warm: connection, metadata, producer id
        _memory_publish(record) if mode == "memory" else producer.publish(record)
    producer.flush(30)
    writes = 0
    latencies: list[int] = []
    cpu0, t0 = _cpu(), time.perf_counter()
    if mode in ("memory", "wal-sync"):
        call = _memory_publish if mode == "memory" else producer.publish
        clock = time.perf_counter_ns
        for record in records:
            start = clock()
            call(record)
            latencies.append(clock() - start)
    else:
        asyncio.run(_groups(producer, records, concurrency, latencies))
    publish_s = time.perf_counter() - t0
    left = producer.flush(60)
    cpu = _cpu() - cpu0
    latencies.sort()
    stats = producer.stats()
    producer.close()
    print(json.dumps({
        "mode": mode, "records": count, "concurrency": concurrency, "publish_s": publish_s,
        "rps": count / publish_s, "p50_us": _percentile(latencies, 0.5), "p99_us": _percentile(latencies, 0.99),
        "p999_us": _percentile(latencies, 0.999), "mean_us": sum(latencies) / len(latencies) / 1000,
        "cpu_us_per_record": cpu / count * 1e6, "writes": writes,
        "records_per_write": count / writes if writes else None, "unflushed": left,
        "sent": stats.sent, "spooled": stats.spooled,
    }), flush=True)  # fmt: skip


async def _groups(
    producer: InferenceLogProducer, records: list[Any], concurrency: int, out: list[int]
) -> None:
    clock = time.perf_counter_ns
    queue = iter(records)

    async def _requests() -> None:
        for record in queue:
            start = clock()
            await producer.write(record)
            out.append(clock() - start)

    await asyncio.gather(*(_requests() for _ in range(concurrency)))


def _ignore(err: object, msg: object) -> None:
    del err, msg


if __name__ == "__main__":
    main(sys.argv[1:])
