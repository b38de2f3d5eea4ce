"""Fixtures of the logging pipeline tests: one test's names, a Cassandra session, a Kafka broker of its own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cassandra.cluster import Cluster
from logging_harness import Run

from stack.kafka import Kafka
from stack.ports import find_free_ports


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return Run(tmp_path)


@pytest.fixture
def cassandra_session(cassandra_server: object) -> Iterator[Cluster]:
    cluster = Cluster(
        cassandra_server.contact_points,  # type: ignore[attr-defined]
        port=cassandra_server.port,  # type: ignore[attr-defined]
        auth_provider=cassandra_server.auth_provider,  # type: ignore[attr-defined]
    )
    yield cluster.connect()
    cluster.shutdown()


@pytest.fixture
def own_kafka(stack: object) -> Iterator[Kafka]:
    """A Kafka broker of this test's own, free to be stopped and started without disturbing the others."""
    broker, controller = find_free_ports(stack.config.host, 2)  # type: ignore[attr-defined]
    kafka = Kafka(
        stack.config,  # type: ignore[attr-defined]
        name=f"kafka-own-{os.getpid()}",
        ports={"kafka": broker, "kafka_controller": controller},
    )
    stack.ensure(kafka)  # type: ignore[attr-defined]
    try:
        yield kafka
    finally:
        stack.release(kafka)  # type: ignore[attr-defined]
