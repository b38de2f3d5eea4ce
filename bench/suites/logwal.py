"""What the write-ahead inference log costs the request path: the pre-WAL in-memory publish vs the durable write.

One Kafka broker (unpinned, like the logging suite); each mode runs in its own `bench.walpub` process
publishing the same gateway-like records (24 features, 8 request inputs, one output, ~700 bytes):

- `memory`: serialize + librdkafka's produce(), the pre-WAL path (a SIGKILL loses the queued records);
- `wal-sync`: `publish()`: one write() per record to the WAL, then produce();
- `group-thread` (the gateway's default) and `group-loop`: CONCURRENCY asyncio tasks each
  `await producer.write(record)` (group commit: one write() per group), on the writer thread or inline
  on the event loop; concurrency 1 (one request at a time: the bare latency) and 32 (a busy gateway);
- `group-thread-always`: the same with an fsync per group (survives a machine crash too).

Per mode: the time a request spends in the call or await (p50/p99 µs), the process's CPU per record
(all threads, librdkafka's included, until Kafka acknowledged everything), records per write().
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Any

from bench.core import Run, Suite
from bench.procs import kafka_env, repo_env, set_affinity

TOPIC = "bench.inference-log-wal.v1"
WAL_KEYS = ("p50_us", "p99_us", "mean_us", "cpu_us_per_record", "records_per_write", "rps")
MODES = (
    ("memory", 1),
    ("wal-sync", 1),
    ("group-thread", 1),
    ("group-loop", 1),
    ("group-thread", 32),
    ("group-loop", 32),
    ("group-thread-always", 32),
)


def body(run: Run, suite: Suite) -> None:
    kafka = run.backends.kafka(None)
    for pid in run.backends.pids("kafka"):
        set_affinity(pid, "0-1")
    count = min(run.settings.log_records, 20_000)
    suite.extra["records_per_rep"] = count
    for mode, concurrency in MODES:

        def rep(duration: float, i: int, mode: str = mode, concurrency: int = concurrency) -> dict[str, Any]:
            del duration
            n = count if i >= 0 else max(2000, count // 10)
            spool = run.work_dir / f"wal-{mode}-{concurrency}-{i + 1}"
            out = subprocess.run([sys.executable, "-m", "bench.walpub", kafka.bootstrap_servers, TOPIC, str(spool),
                                  mode, str(n), str(concurrency)],
                                 check=False, capture_output=True, text=True, timeout=600, env=repo_env(kafka_env(kafka)))  # fmt: skip
            if out.returncode != 0:
                raise RuntimeError(f"walpub failed: {out.stderr[-2000:]}")
            pub = json.loads(out.stdout.strip().splitlines()[-1])
            return {
                "rps": pub["rps"], "requests": float(n), "errors": float(pub["unflushed"]),
                "p50_ms": pub["p50_us"] / 1000, "p99_ms": pub["p99_us"] / 1000, "p999_ms": pub["p999_us"] / 1000,
                "p50_us": pub["p50_us"], "p99_us": pub["p99_us"], "mean_us": pub["mean_us"],
                "cpu_us_per_record": pub["cpu_us_per_record"],
                "records_per_write": pub["records_per_write"] or 0.0,
            }  # fmt: skip

        point = run.measure(suite, system=f"inference log: {mode}", key=mode, protocol="Kafka", tool="bench.walpub",
                            params={"concurrency": concurrency, "records": count}, rep=rep)  # fmt: skip
        reps = point.get("reps") or []
        if reps:  # the harness keeps medians of its standard keys only
            point["wal"] = {k: statistics.median(r[k] for r in reps) for k in WAL_KEYS}
            run.save()
