"""`make up` / `make down` as a developer runs them: the whole stack from nothing, data kept across a
restart, nothing left running after `down`, and a clear error when a foreign process holds a port."""

import dataclasses
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cassandra.cluster import Cluster
from confluent_kafka import Consumer, Producer

from stack.cassandra import admin_auth
from stack.config import REPO_ROOT, StackConfig
from stack.kafka import Kafka
from stack.ports import DEFAULT_PORTS, find_free_ports, is_port_free, port_env_var
from stack.probes import tcp_open
from stack.process import ProcessRecord, find_marked_processes
from stack.registry import COMPONENTS
from tests.stack_fixtures import session_state_dir

pytestmark = pytest.mark.integration


def run_cli(config: StackConfig, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    """Runs `python -m stack ARGS` (what the Makefile targets run) against `config`."""
    return subprocess.run(
        [sys.executable, "-m", "stack", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **config.to_env()},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def own_stack(stack_config: StackConfig) -> Iterator[StackConfig]:
    """A stack of its own (state folder inside the session's, free ports), torn down whatever happens."""
    state_dir = session_state_dir() / f"cli-{uuid.uuid4().hex[:6]}"
    ports = find_free_ports(stack_config.host, len(DEFAULT_PORTS), exclude=set(stack_config.ports.values()))
    config = dataclasses.replace(
        stack_config, state_dir=state_dir, ports=dict(zip(DEFAULT_PORTS, ports, strict=True))
    )
    try:
        yield config
    finally:
        run_cli(config, "down")
        if not list(find_marked_processes(str(state_dir))):
            shutil.rmtree(state_dir, ignore_errors=True)


def _check(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _stack_pids(config: StackConfig) -> list[int]:
    return [p.pid for p in find_marked_processes(str(config.state_dir))]


def _recorded_pids(config: StackConfig) -> list[int]:
    records = [ProcessRecord.read(path) for path in sorted(config.run_dir.glob("*.json"))]
    return [record.pid for record in records if record is not None]


def test_up_down_up_keeps_data_and_down_leaves_nothing_running(own_stack: StackConfig) -> None:
    config = own_stack
    _check(run_cli(config, "up"))
    table = _check(run_cli(config, "status"))
    for name in COMPONENTS:
        assert any(line.startswith(name) and "healthy" in line for line in table.splitlines()), table
    first_pids = _recorded_pids(config)
    assert len(first_pids) == len(COMPONENTS)

    # A Cassandra row and a Kafka message.
    keyspace, topic = f"persist_{uuid.uuid4().hex[:8]}", f"persist-{uuid.uuid4().hex[:8]}"
    cluster = Cluster([config.host], port=config.port("cassandra"), auth_provider=admin_auth(config))
    try:
        session = cluster.connect()
        session.execute(
            f"CREATE KEYSPACE {keyspace} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
        )
        session.execute(f"CREATE TABLE {keyspace}.kv (k text PRIMARY KEY, v text)")
        session.execute(f"INSERT INTO {keyspace}.kv (k, v) VALUES ('survives', 'down and up')")
    finally:
        cluster.shutdown()
    kafka = Kafka(config).client_conf()  # as the administrator
    producer = Producer({**kafka, "acks": "all"})
    producer.produce(topic, key=b"k", value=b"survives down and up")
    assert producer.flush(30) == 0

    # `make down`: every stack process is gone and every port is free again.
    _check(run_cli(config, "down"))
    assert _stack_pids(config) == []
    assert not any(Path(f"/proc/{pid}").exists() and _is_running(pid) for pid in first_pids)
    assert [port for port in config.ports.values() if not is_port_free(config.host, port)] == []
    assert "stopped" in _check(run_cli(config, "status"))

    # `make up` again: the row and the message are still there.
    _check(run_cli(config, "up", "cassandra", "kafka"))
    cluster = Cluster([config.host], port=config.port("cassandra"), auth_provider=admin_auth(config))
    try:
        row = cluster.connect().execute(f"SELECT v FROM {keyspace}.kv WHERE k = 'survives'").one()
    finally:
        cluster.shutdown()
    assert row is not None
    assert row.v == "down and up"
    consumer = Consumer(
        {
            **kafka,
            "group.id": f"persist-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
        }
    )
    try:
        consumer.subscribe([topic])
        message = None
        deadline = time.monotonic() + 60
        while message is None and time.monotonic() < deadline:
            candidate = consumer.poll(1.0)
            if candidate is not None and candidate.error() is None:
                message = candidate
    finally:
        consumer.close()
    assert message is not None
    assert message.value() == b"survives down and up"

    _check(run_cli(config, "down"))
    assert _stack_pids(config) == []


def _is_running(pid: int) -> bool:
    """False for a zombie (exited, not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def test_port_taken_by_a_foreign_process_is_a_clear_error_and_that_process_survives(
    own_stack: StackConfig,
) -> None:
    config = own_stack
    (port,) = find_free_ports(config.host, 1, exclude=set(config.ports.values()))
    foreign = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, time\n"
            f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\n"
            "print('listening', flush=True)\n"
            "time.sleep(300)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert foreign.stdout is not None
        assert foreign.stdout.readline().strip() == "listening"
        config = config.with_ports({"redis": port})

        result = run_cli(config, "up", "redis")

        assert result.returncode == 1
        message = result.stderr
        assert f"port {port}" in message
        assert "redis" in message
        assert port_env_var("redis") in message
        assert f"pid {foreign.pid}" in message
        _check(run_cli(config, "down"))
        assert foreign.poll() is None, "the foreign process must be left alone"
        assert tcp_open(config.host, port)
    finally:
        foreign.kill()
        foreign.wait()
