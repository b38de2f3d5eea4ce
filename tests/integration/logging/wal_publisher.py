"""Test helper, run as a process: a gateway-like producer that prints each request id once its record is written.

    python wal_publisher.py BOOTSTRAP TOPIC SPOOL_DIR TAG COUNT CONCURRENCY [--drain]

CONCURRENCY asyncio tasks (a gateway's concurrent requests) each `await producer.write(record)` (the
group-committed write-ahead log) and then print the record's request id — what the gateway does before
answering. It prints `READY` once the producer started and `DONE <stats json>` at the end. With COUNT
records written it waits to be killed, unless `--drain`: then it waits until the spool is empty (every
record, its own and any an earlier process left, acknowledged by Kafka) and closes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from pathlib import Path

from inference_log_publisher import kafka_config, make_record


async def main(argv: list[str]) -> None:
    from libs.inference_log import InferenceLogConfig, InferenceLogProducer

    bootstrap, topic, spool, tag = argv[:4]
    count, concurrency = int(argv[4]), int(argv[5])
    drain = "--drain" in argv
    producer = InferenceLogProducer(
        InferenceLogConfig(
            inference_log_topic=topic,
            inference_log_spool_dir=Path(spool),
            inference_log_resend_interval_s=0.5,
        ),
        kafka_config(bootstrap),
    )
    producer.start()
    print("READY", flush=True)
    ids = iter(range(count))

    async def _requests() -> None:
        for i in ids:
            record = make_record(tag, i)
            if i == 5:  # keep records small: the big one of make_record is for the sink tests
                record.features["user:notes"].string_value = "x"
            await producer.write(record)
            print(record.request_id, flush=True)  # "answered"
            await asyncio.sleep(0.002)  # a steady stream, so that a kill lands mid-stream

    await asyncio.gather(*(_requests() for _ in range(concurrency)))
    if not drain:
        await asyncio.sleep(3600)  # until SIGKILL
    drained = await asyncio.to_thread(producer.drain_spool, 120.0)
    await asyncio.to_thread(producer.close)
    print("DONE", json.dumps({"drained": drained, **dataclasses.asdict(producer.stats())}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
