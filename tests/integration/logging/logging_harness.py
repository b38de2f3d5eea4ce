"""The logging pipeline tests' harness: one test's names (`Run`), the logging service as a process
(`LoggingService`), and what each sink holds."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from libs.testing import free_port, service_env, spawn_module, stop_process, wait_serving
from services.logging.lake import read_table
from services.logging.server import SERVICE_NAME
from stack.cassandra import admin_env as cassandra_admin_env
from stack.kafka import Kafka, credential_env

# The query API's operator credential (every tenant's records and GetStats; services/logging/access.py).
ADMIN = (("authorization", "Bearer logging-pipeline-test-admin-token"),)


@dataclass
class Run:
    """Names of one test's topic, group, keyspace and lake."""

    tmp: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def topic(self) -> str:
        return f"inference-log-{self.tag}"

    @property
    def keyspace(self) -> str:
        return f"logging_{self.tag}"

    @property
    def lake(self) -> Path:
        return self.tmp / "lake"

    @property
    def spool(self) -> Path:
        return self.tmp / "spool"


class LoggingService:
    """`python -m services.logging` as a process, its output kept in a file."""

    def __init__(self, run: Run, kafka: Kafka, cassandra_port: int, **extra: str) -> None:
        self.port = free_port()
        self.log_path = run.tmp / f"logging-{self.port}.log"
        self.env = {
            **service_env("logging", self.port),
            "INFERGRID_LOGGING_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            # As the administrator: the tests use topics and groups of their own.
            **credential_env(kafka.config, "admin", "INFERGRID_LOGGING_"),
            "INFERGRID_LOGGING_TOPIC": run.topic,
            "INFERGRID_LOGGING_DEAD_LETTER_TOPIC": f"{run.topic}.dlq",
            "INFERGRID_LOGGING_CONSUMER_GROUP": f"logging-{run.tag}",
            "INFERGRID_LOGGING_TOPIC_PARTITIONS": "3",
            "INFERGRID_LOGGING_SESSION_TIMEOUT_MS": "6000",
            "INFERGRID_LOGGING_LAKE_DIR": str(run.lake),
            "INFERGRID_LOGGING_LAKE_ROLL_SECONDS": "1",
            "INFERGRID_LOGGING_CASSANDRA_PORT": str(cassandra_port),
            # As the administrator: the tests use keyspaces of their own.
            **cassandra_admin_env(kafka.config, "INFERGRID_LOGGING_CASSANDRA"),
            "INFERGRID_LOGGING_CASSANDRA_KEYSPACE": run.keyspace,
            "INFERGRID_LOGGING_CASSANDRA_WRITE_CONSISTENCY": "ONE",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "",
            "INFERGRID_LOGGING_QUERY_ADMIN_TOKEN": ADMIN[0][1].removeprefix("Bearer "),
            **extra,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = spawn_module("services.logging", self.env)
        log = self.log_path.open("ab")
        # Drain both pipes so a chatty service never blocks on a full pipe.
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=_copy, args=(stream, log), daemon=True).start()
        asyncio.run(wait_serving(self.port, SERVICE_NAME, None, timeout=90))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def _copy(stream: object, sink: object) -> None:
    for line in iter(stream.readline, b""):  # type: ignore[attr-defined]
        sink.write(line)  # type: ignore[attr-defined]
        sink.flush()  # type: ignore[attr-defined]


def cassandra_ids(session: object, run: Run) -> tuple[list[str], int]:
    """Request ids in the by-request table and the row count of the by-model table."""
    try:
        by_request = [
            r.request_id
            for r in session.execute(f"SELECT request_id FROM {run.keyspace}.inference_log_by_tenant_request")
        ]  # type: ignore[attr-defined]
        by_model = session.execute(
            f"SELECT count(*) FROM {run.keyspace}.inference_log_by_tenant_model"
        ).one()[0]  # type: ignore[attr-defined]
    except Exception:  # keyspace or table not there yet
        return [], 0
    return by_request, int(by_model)


def lake_ids(run: Run, *, dedupe: bool) -> list[str]:
    return read_table(run.lake, dedupe=dedupe).column("request_id").to_pylist() if run.lake.exists() else []


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, service: LoggingService) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; service log:\n{service.logs()}")


def assert_exactly_once(session: object, run: Run, expected: set[str], *, physical_lake: bool) -> None:
    by_request, by_model = cassandra_ids(session, run)
    assert len(by_request) == len(expected) and set(by_request) == expected
    assert by_model == len(expected)
    lake = lake_ids(run, dedupe=False)
    assert set(lake) == expected
    if physical_lake:
        assert len(lake) == len(expected), "a record is in more than one lake file"
    assert len(lake_ids(run, dedupe=True)) == len(expected)


def wait_for_both_sinks(
    session: object, run: Run, expected: set[str], what: str, service: LoggingService
) -> None:
    """Waits (3 minutes at most) until the lake and Cassandra hold the `expected` ids, then checks each once."""
    wait_for(
        lambda: (
            set(lake_ids(run, dedupe=True)) == expected and set(cassandra_ids(session, run)[0]) == expected
        ),
        180,
        what,
        service,
    )
    assert_exactly_once(session, run, expected, physical_lake=False)
