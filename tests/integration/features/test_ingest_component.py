"""The stack's feature stream ingester component starts against the real servers and exports its lag."""

from __future__ import annotations

import dataclasses
import time
import urllib.request
from pathlib import Path

import pytest

from libs.testing import free_port
from stack.cassandra import Cassandra
from stack.cassandra import credential_env as cassandra_credentials
from stack.config import StackConfig
from stack.kafka import Kafka, credential_env
from stack.redis import Redis
from stack.services import features_ingest

pytestmark = pytest.mark.integration


def test_the_ingester_component_starts_and_reports_consumer_lag(
    stack_config: StackConfig,
    redis_server: Redis,
    cassandra_server: Cassandra,
    kafka_server: Kafka,
    tmp_path: Path,
) -> None:
    config = dataclasses.replace(stack_config, state_dir=tmp_path / "state")
    port = free_port()
    component = features_ingest(
        config,
        ports={"features_ingest_metrics": port},
        env={
            "INFERGRID_FEATURES_CASSANDRA_PORT": str(cassandra_server.port),
            **cassandra_credentials(cassandra_server.config, "features", "INFERGRID_FEATURES_CASSANDRA"),
            "INFERGRID_FEATURES_KAFKA_BOOTSTRAP_SERVERS": kafka_server.bootstrap_servers,
            # The stack's ingester user (the session's passwords, not those of this test's state folder).
            **credential_env(kafka_server.config, "features", "INFERGRID_FEATURES_"),
            "INFERGRID_FEATURES_REDIS_URL": redis_server.url,
            "INFERGRID_FEATURES_CASSANDRA_WRITE_CONSISTENCY": "ONE",
        },
    )
    component.start()
    try:
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline and "infergrid_features_stream_consumer_lag " not in text:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
            time.sleep(0.5)
        assert "infergrid_features_stream_consumer_lag " in text
    finally:
        component.stop()
