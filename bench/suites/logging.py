"""Logging pipeline: records/s from publish (libs.inference_log) to the sink (services.logging writing
Cassandra, buffering the Parquet lake), and the producer's cost per record on the request path.

Kafka (one KRaft node), Cassandra, the logging service and the publisher share both cores (unpinned): a
pipeline throughput, not a side-by-side comparison. Each repetition publishes COUNT new records; the
clock runs from the first publish() until the service's GetStats says all of them were written.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import grpc

from bench.core import Run, Suite
from bench.procs import free_port, group_cpu_seconds, pids_cpu_seconds, repo_env, set_affinity
from bench.suites.common import service_env, wait_grpc_serving
from infergrid.logging.v1 import logging_pb2, logging_pb2_grpc

TOPIC = "bench.inference-log.v1"


async def records_total(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = await logging_pb2_grpc.InferenceLogServiceStub(ch).GetStats(
            logging_pb2.GetStatsRequest(), timeout=5
        )
    return int(reply.records_total)


def body(run: Run, suite: Suite) -> None:
    count = run.settings.log_records
    kafka = run.backends.kafka(None)
    cassandra = run.backends.cassandra(None)
    for pid in run.backends.pids("cassandra", "kafka", "redis"):
        set_affinity(pid, "0-1")  # unpinned for this suite
    port = free_port()
    env = service_env("INFERGRID_LOGGING_", port, {
        "INFERGRID_LOGGING_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "INFERGRID_LOGGING_TOPIC": TOPIC,
        "INFERGRID_LOGGING_DEAD_LETTER_TOPIC": f"{TOPIC}.dlq",
        "INFERGRID_LOGGING_CONSUMER_GROUP": f"bench-{run.doc['run']['id']}",
        "INFERGRID_LOGGING_TOPIC_PARTITIONS": "6",
        "INFERGRID_LOGGING_LAKE_DIR": str(run.work_dir / "lake"),
        "INFERGRID_LOGGING_CASSANDRA_PORT": str(cassandra.port),
        "INFERGRID_LOGGING_CASSANDRA_KEYSPACE": "bench_logging",
        "INFERGRID_LOGGING_CASSANDRA_WRITE_CONSISTENCY": "ONE",
    })  # fmt: skip
    server = run.procs.start("logging", [sys.executable, "-m", "services.logging"], env=env)
    wait_grpc_serving(server, port, timeout=120)
    server.extra_pids = run.backends.pids("cassandra", "kafka")  # the CPU column counts the whole pipeline
    backend_pids = dict(zip(("cassandra", "kafka"), server.extra_pids, strict=True))
    suite.extra["records_per_rep"] = count
    done_before = asyncio.run(records_total(port))

    def rep(duration: float, i: int) -> dict[str, Any]:
        nonlocal done_before
        n = count if i >= 0 else max(1000, count // 10)
        tag = f"r{i + 1}-{run.doc['run']['id']}"
        cpu0 = server.cpu_seconds()
        parts0 = {"logging": group_cpu_seconds(server.pid),
                  **{k: pids_cpu_seconds([v]) for k, v in backend_pids.items()}}  # fmt: skip
        out = subprocess.run([sys.executable, "-m", "bench.logpub", kafka.bootstrap_servers, TOPIC,
                              str(run.work_dir / f"spool-{tag}"), tag, str(n)],
                             check=False, capture_output=True, text=True, timeout=600, env=repo_env())  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"publisher failed: {out.stderr[-2000:]}")
        pub = json.loads(out.stdout.strip().splitlines()[-1])
        target = done_before + n
        deadline = time.monotonic() + 180
        total = done_before
        while time.monotonic() < deadline:
            total = asyncio.run(records_total(port))
            if total >= target:
                break
            if not server.alive():
                raise RuntimeError(f"logging service died:\n{server.log_tail()}")
            time.sleep(0.1)
        finished = time.time()
        parts1 = {"logging": group_cpu_seconds(server.pid),
                  **{k: pids_cpu_seconds([v]) for k, v in backend_pids.items()}}  # fmt: skip
        done_before = total
        if total < target:
            raise RuntimeError(f"only {total - (target - n)} of {n} records reached the sink in 180 s")
        elapsed = finished - pub["started"]
        return {
            "rps": n / elapsed, "requests": float(n), "errors": float(pub["stats"]["failed"] + pub["unflushed"]),
            "duration_s": elapsed, "server_cpu": (server.cpu_seconds() - cpu0) / elapsed,
            "publish_us_p50": pub["publish_us_p50"], "publish_us_p99": pub["publish_us_p99"],
            "publish_us_p999": pub["publish_us_p999"], "publish_us_mean": pub["publish_us_mean"],
            "producer_cpu_us_per_record": pub["cpu_us_per_record_incl_delivery"],
            "producer_loop_cpu_us_per_record": pub["cpu_us_per_record_publish_loop"],
            "publish_only_rps": n / pub["publish_s"], "record_bytes": pub["record_bytes"],
            "spooled": pub["stats"]["spooled"],
            "cpu_us_per_record": {k: round((parts1[k] - parts0[k]) / n * 1e6, 1) for k in parts1}
            | {"publisher": round(pub["cpu_us_per_record_incl_delivery"], 1)},
        }  # fmt: skip

    point = run.measure(suite, system="publish (InferenceLogProducer) → Kafka → logging service → Cassandra",
                        key="pipeline", protocol="Kafka", tool="bench.logpub", params={"records": count}, rep=rep)  # fmt: skip
    reps = point.get("reps") or []
    if reps:
        import statistics

        point["producer"] = {k: statistics.median(r[k] for r in reps) for k in (
            "publish_us_p50", "publish_us_p99", "publish_us_p999", "publish_us_mean", "producer_cpu_us_per_record",
            "producer_loop_cpu_us_per_record", "publish_only_rps", "record_bytes")}  # fmt: skip
        point["pipeline_cpu_us_per_record"] = {
            k: statistics.median(r["cpu_us_per_record"][k] for r in reps)
            for k in reps[0]["cpu_us_per_record"]
        }
    run.procs.stop(server)
