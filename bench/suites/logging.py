"""Logging pipeline: records/s from publish (libs.inference_log) to the sink (services.logging writing
Cassandra, buffering the Parquet lake), CPU per record of every process, and the producer's cost per record
on the request path.

Cassandra runs alone on CPU 1, as it would on its own machine in production; Kafka (one KRaft node), the
logging service and the publisher share CPU 0. Each repetition publishes COUNT new records; the clock runs
from the first publish() until the service's GetStats says all of them were written.

With INFERGRID_BENCH_LOGGING_BASELINE=<checkout> (e.g. a `git worktree` of an earlier commit with its own
`build/gen`), the logging service of that checkout is measured too, in the same run: both services run
side by side (their own topic, consumer group and keyspace; an idle consumer costs next to nothing) and
their repetitions alternate, so both see the same Kafka, the same Cassandra and the same machine load.
Point `pipeline` is this checkout, `pipeline-baseline` the other.

A second point per service, `backlog`, measures the consumer alone, as Kafka's own consumer-perf tool does:
COUNT records are published while its service is stopped, then it starts and drains them. The publisher is
idle by then, so CPU 0 holds only the logging service and Kafka serving fetches; the rate and the CPU per
record are taken over the drain itself (from the first stored record to the last, GetStats polled every
100 ms: each poll is a call the service answers, so it polls rarely), not over the start-up.

With INFERGRID_BENCH_LOGGING_FLAME=1 (or in a full run), py-spy records a flame graph of each service
(`flame-logging.svg`, `flame-logging-baseline.svg`) in an extra, unmeasured repetition.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench import stats
from bench.core import Run, Suite
from bench.procs import (
    Server,
    free_port,
    group_cpu_seconds,
    kafka_env,
    pids_cpu_seconds,
    pinned,
    repo_env,
    set_affinity,
)
from bench.suites.common import service_env, wait_grpc_serving
from bench.tools import ensure_venv, say
from infergrid.logging.v1 import logging_pb2, logging_pb2_grpc
from libs.checkout import python_path
from stack.cassandra import admin_env as cassandra_admin_env
from stack.kafka import credential_env

TOPIC = "bench.inference-log.v1"
BASELINE_ENV = "INFERGRID_BENCH_LOGGING_BASELINE"
FLAME_ENV = "INFERGRID_BENCH_LOGGING_FLAME"
CASSANDRA_CPUS = "1"  # Cassandra alone
PIPELINE_CPUS = "0"  # Kafka, the logging service, the publisher
# The query API's operator credential (GetStats), fresh per run.
ADMIN_TOKEN = secrets.token_urlsafe(24)
PRODUCER_KEYS = ("publish_us_p50", "publish_us_p99", "publish_us_p999", "publish_us_mean",
                 "producer_cpu_us_per_record", "producer_loop_cpu_us_per_record", "publish_only_rps",
                 "record_bytes")  # fmt: skip


async def records_total(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = await logging_pb2_grpc.InferenceLogServiceStub(ch).GetStats(
            logging_pb2.GetStatsRequest(), metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),), timeout=5
        )
    return int(reply.records_total)


@dataclass
class _System:
    """One logging service under test: the checkout it runs from, its topic, and its counters."""

    key: str
    label: str
    root: Path
    topic: str
    port: int
    server: Server
    done_before: int = 0


def _start(run: Run, key: str, label: str, root: Path, *, kafka: Any, cassandra: Any) -> _System:
    port = free_port()
    topic = f"{TOPIC}.{key}"
    env = service_env("INFERGRID_LOGGING_", port, {
        "PYTHONPATH": python_path(root, inherit=False),
        "INFERGRID_LOGGING_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        **credential_env(kafka.config, "admin", "INFERGRID_LOGGING_"),  # a topic and group of its own
        "INFERGRID_LOGGING_TOPIC": topic,
        "INFERGRID_LOGGING_DEAD_LETTER_TOPIC": f"{topic}.dlq",
        "INFERGRID_LOGGING_CONSUMER_GROUP": f"bench-{key}-{run.doc['run']['id']}",
        "INFERGRID_LOGGING_TOPIC_PARTITIONS": "6",
        "INFERGRID_LOGGING_LAKE_DIR": str(run.work_dir / f"lake-{key}"),
        "INFERGRID_LOGGING_CASSANDRA_PORT": str(cassandra.port),
        "INFERGRID_LOGGING_CASSANDRA_KEYSPACE": f"bench_logging_{key.replace('-', '_')}",
        **cassandra_admin_env(cassandra.config, "INFERGRID_LOGGING_CASSANDRA"),  # a keyspace of its own
        "INFERGRID_LOGGING_CASSANDRA_WRITE_CONSISTENCY": "ONE",
        "INFERGRID_LOGGING_QUERY_ADMIN_TOKEN": ADMIN_TOKEN,
    })  # fmt: skip
    server = run.procs.start(
        f"logging-{key}", [sys.executable, "-m", "services.logging"], env=env, cwd=root, cpus=PIPELINE_CPUS
    )
    wait_grpc_serving(server, port, timeout=120)
    system = _System(key, label, root, topic, port, server)
    system.done_before = asyncio.run(records_total(port))
    return system


def _flame(system: _System, out_svg: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    """Starts py-spy on the service (all its processes) for `seconds`; None when py-spy is unavailable."""
    try:
        spy = ensure_venv("tools") / "bin" / "py-spy"
    except Exception as exc:
        say(f"py-spy unavailable: {exc}")
        return None
    command = [str(spy), "record", "--pid", str(system.server.pid), "--subprocesses", "--duration",
               str(int(seconds)), "--rate", "250", "--nonblocking", "--format", "flamegraph",
               "--output", str(out_svg)]  # fmt: skip
    return subprocess.Popen(
        pinned(command, CASSANDRA_CPUS), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def body(run: Run, suite: Suite) -> None:
    count = run.settings.log_records
    kafka = run.backends.kafka(None)
    cassandra = run.backends.cassandra(None)
    pids = dict(zip(("cassandra", "kafka"), run.backends.pids("cassandra", "kafka"), strict=True))
    set_affinity(pids["cassandra"], CASSANDRA_CPUS)
    set_affinity(pids["kafka"], PIPELINE_CPUS)
    for pid in run.backends.pids("redis"):
        set_affinity(pid, PIPELINE_CPUS)
    here = Path(__file__).resolve().parents[2]
    systems = [_start(run, "pipeline", "this checkout", here, kafka=kafka, cassandra=cassandra)]
    baseline = os.environ.get(BASELINE_ENV)
    if baseline:
        root = Path(baseline).resolve()
        systems.append(
            _start(
                run, "pipeline-baseline", f"baseline checkout {root}", root, kafka=kafka, cassandra=cassandra
            )
        )
    for system in systems:
        system.server.extra_pids = list(pids.values())  # the CPU column counts the whole pipeline
    suite.extra.update(records_per_rep=count, cpus={"cassandra": CASSANDRA_CPUS, "kafka, logging service, publisher": PIPELINE_CPUS},
                       systems={s.key: s.label for s in systems})  # fmt: skip

    def rep(system: _System, n: int, tag: str) -> dict[str, Any]:
        server = system.server
        cpu0 = server.cpu_seconds()
        parts0 = {"logging": group_cpu_seconds(server.pid),
                  **{k: pids_cpu_seconds([v]) for k, v in pids.items()}}  # fmt: skip
        pub = _publish(run, kafka, system.topic, n, f"{system.key}-{tag}")
        target = system.done_before + n
        deadline = time.monotonic() + 180
        total = system.done_before
        while time.monotonic() < deadline:
            total = asyncio.run(records_total(system.port))
            if total >= target:
                break
            if not server.alive():
                raise RuntimeError(f"logging service died:\n{server.log_tail()}")
            time.sleep(0.05)
        finished = time.time()
        parts1 = {"logging": group_cpu_seconds(server.pid),
                  **{k: pids_cpu_seconds([v]) for k, v in pids.items()}}  # fmt: skip
        system.done_before = total
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
            "spooled": pub["stats"]["spooled"], "load_1m": round(os.getloadavg()[0], 2),
            "cpu_us_per_record": {k: round((parts1[k] - parts0[k]) / n * 1e6, 1) for k in parts1}
            | {"publisher": round(pub["cpu_us_per_record_incl_delivery"], 1)},
        }  # fmt: skip

    points: dict[str, dict[str, Any]] = {}
    for system in systems:
        points[system.key] = {
            "system": f"publish (InferenceLogProducer) → Kafka → logging service ({system.label}) → Cassandra",
            "key": system.key, "protocol": "Kafka", "tool": "bench.logpub", "params": {"records": count},
            "reps": [], "load_1m": round(os.getloadavg()[0], 2),
        }  # fmt: skip
    try:
        for system in systems:  # warm-up: JIT, connections, topics
            rep(system, max(1000, count // 10), "warmup")
        if not run.settings.quick or os.environ.get(FLAME_ENV):
            for system in systems:
                name = "flame-logging.svg" if system.key == "pipeline" else f"flame-{system.key}.svg"
                spy = _flame(system, run.out_dir / name, seconds=6)
                rep(system, count, "flame")
                if spy is not None and spy.wait(timeout=120) != 0:
                    say(f"py-spy failed: {(spy.stderr.read() if spy.stderr else b'').decode()[-500:]}")
        for i in range(run.settings.reps):
            for system in systems if i % 2 == 0 else list(reversed(systems)):
                points[system.key]["reps"].append(rep(system, count, f"r{i + 1}"))
    except Exception as exc:
        for point in points.values():
            point["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        say(f"logging: FAILED {exc}")
    for system in systems:
        point = points[system.key]
        reps = point["reps"]
        if reps:
            point["median"] = stats.median_of_reps(reps)
            point["spread"] = round(stats.spread(reps), 4)
            point["producer"] = {k: statistics.median(r[k] for r in reps) for k in PRODUCER_KEYS}
            point["pipeline_cpu_us_per_record"] = {
                k: statistics.median(r["cpu_us_per_record"][k] for r in reps)
                for k in reps[0]["cpu_us_per_record"]
            }
            cpu = point["pipeline_cpu_us_per_record"]
            say(f"logging/{system.key}: {point['median']['rps']:,.0f} records/s; CPU µs per record {cpu}")
        suite.points.append(point)
        run.save()
    for system in systems:
        run.procs.stop(system.server)
    for system in systems:
        suite.points.append(_backlog_point(run, system, kafka=kafka, cassandra=cassandra, pids=pids))
        run.save()


def _publish(run: Run, kafka: Any, topic: str, n: int, tag: str) -> dict[str, Any]:
    """Publishes `n` records to `topic` with bench.logpub on the pipeline CPU; its JSON summary."""
    command = [sys.executable, "-m", "bench.logpub", kafka.bootstrap_servers, topic,
               str(run.work_dir / f"spool-{tag}"), tag, str(n)]  # fmt: skip
    out = subprocess.run(pinned(command, PIPELINE_CPUS), check=False, capture_output=True, text=True,
                         timeout=600, env=repo_env(kafka_env(kafka)))  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"publisher failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _backlog_point(
    run: Run, system: _System, *, kafka: Any, cassandra: Any, pids: dict[str, int]
) -> dict[str, Any]:
    """The consumer draining a backlog of COUNT records per repetition (module docstring)."""
    count = run.settings.log_records
    key = f"{system.key}-backlog"
    point: dict[str, Any] = {
        "system": f"Kafka backlog → logging service ({system.label}) → Cassandra (consumer alone)",
        "key": key, "protocol": "Kafka", "tool": "bench.logpub, then drain", "params": {"records": count},
        "reps": [], "load_1m": round(os.getloadavg()[0], 2),
    }  # fmt: skip
    # The first start creates the topics, the keyspace and the consumer group (nothing to consume yet).
    drain = _start(run, key, system.label, system.root, kafka=kafka, cassandra=cassandra)
    run.procs.stop(drain.server)
    try:
        for i in range(run.settings.reps + 1):  # the first repetition warms Cassandra's tables: not kept
            tag = f"{key}-r{i}"
            _publish(run, kafka, drain.topic, count, tag)
            drain = _start(run, key, system.label, system.root, kafka=kafka, cassandra=cassandra)
            samples = _drain(drain, count, pids)
            run.procs.stop(drain.server)
            (t0, n0, c0), (t1, n1, c1) = samples[0], samples[-1]
            if n1 < count:
                raise RuntimeError(f"only {n1} of {count} backlog records reached the sink in 180 s")
            records, elapsed = n1 - n0, t1 - t0
            rep = {
                "rps": records / elapsed, "requests": float(records), "errors": 0.0, "duration_s": elapsed,
                "server_cpu": sum(c1[k] - c0[k] for k in c1) / elapsed, "load_1m": round(os.getloadavg()[0], 2),
                "cpu_us_per_record": {k: round((c1[k] - c0[k]) / records * 1e6, 1) for k in c1},
            }  # fmt: skip
            if i:
                point["reps"].append(rep)
    except Exception as exc:
        point["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        say(f"logging backlog: FAILED {exc}")
        run.procs.stop(drain.server)
    reps = point["reps"]
    if reps:
        point["median"] = stats.median_of_reps(reps)
        point["spread"] = round(stats.spread(reps), 4)
        cpu = {
            k: statistics.median(r["cpu_us_per_record"][k] for r in reps)
            for k in reps[0]["cpu_us_per_record"]
        }
        point["pipeline_cpu_us_per_record"] = cpu
        say(f"logging/{key}: {point['median']['rps']:,.0f} records/s; CPU µs per record {cpu}")
    return point


def _drain(system: _System, count: int, pids: dict[str, int]) -> list[tuple[float, int, dict[str, float]]]:
    """(time, records stored, CPU seconds by process) from the first stored record until all `count` are."""

    def cpu() -> dict[str, float]:
        return {
            "logging": group_cpu_seconds(system.server.pid),
            **{k: pids_cpu_seconds([v]) for k, v in pids.items()},
        }

    samples: list[tuple[float, int, dict[str, float]]] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        total = asyncio.run(records_total(system.port))
        if total:
            samples.append((time.monotonic(), total, cpu()))
            if total >= count:
                break
        if not system.server.alive():
            raise RuntimeError(f"logging service died:\n{system.server.log_tail()}")
        time.sleep(0.1)
    if len(samples) < 2:
        raise RuntimeError(f"the backlog drained between two polls or not at all ({samples[-1:]})")
    return samples
