"""Service processes for the deploy and console tests: how to start each service (or worker) for real.

Each STARTERS entry returns the environment a service needs, with the real backends from the stack
fixtures (Kafka and Cassandra for logging, Redis and Cassandra for features, a demo model repository for
inference, a real inference process for the gateway); `Running` starts it on free ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from prometheus_client.parser import text_string_to_metric_families

from libs.checkout import checkout_env
from libs.testing import REPO_ROOT, free_port, spawn_module, stop_process, wait_serving
from stack.cassandra import admin_env as cassandra_admin_env
from stack.prometheus import Prometheus, write_targets
from tests.deploy.k8s_objects import WORKERS, service_code

Env = dict[str, str]
_MATCHER = re.compile(r'(\w+)\s*(=|!=|=~|!~)\s*"([^"]*)"')


def _series(query: str) -> tuple[str, dict[str, str]]:
    """("grpc_server_handled_total", {"grpc_service": "..."}) from a seriesQuery (equality matchers only)."""
    name, _, rest = query.partition("{")
    labels = {k: v for k, op, v in _MATCHER.findall(rest) if op == "=" and v}
    return name.strip(), labels


def _inference_env(request: pytest.FixtureRequest, tmp: Path) -> Env:
    repo = tmp / "models"
    subprocess.run(
        [sys.executable, "-m", "stack.demo_model", "--repo", str(repo)],
        cwd=REPO_ROOT,
        env=checkout_env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    # Its HTTP port free too: the gateway's own inference process may run beside this one.
    return {
        "INFERGRID_INFERENCE_MODEL_REPOSITORY": str(repo),
        "INFERGRID_INFERENCE_HTTP_PORT": str(free_port()),
    }


def _gateway_env(request: pytest.FixtureRequest, tmp: Path) -> Env:
    """The gateway with the demo model, a real inference process behind it and no feature service."""
    inference_env = _inference_env(request, tmp)
    inference = Running("inference", inference_env)
    request.addfinalizer(lambda: stop_process(inference.proc))
    from services.inference.server import SERVICE_NAME as INFERENCE_SERVICE

    asyncio.run(wait_serving(inference.port, INFERENCE_SERVICE, inference.proc, timeout=120))
    return {
        "INFERGRID_GATEWAY_MODEL_REPOSITORY": inference_env["INFERGRID_INFERENCE_MODEL_REPOSITORY"],
        "INFERGRID_GATEWAY_FEATURES_TARGET": f"127.0.0.1:{free_port()}",
        "INFERGRID_GATEWAY_INFERENCE_TARGET": f"127.0.0.1:{inference.port}",
        "INFERGRID_GATEWAY_INFERENCE_LOG_ENABLED": "false",
        "INFERGRID_GATEWAY_INFERENCE_LOG_SPOOL_DIR": str(tmp / "spool"),
    }


async def _predict(port: int) -> None:
    """One demo prediction through the gateway (features unreachable: defaults serve)."""
    from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
    from stack import demo_model as demo

    # One key per entity the demo model's features come from ("user" -> user_id, ...).
    entities = {f"{f.source}_id": "1" for f in demo.FEATURES if f.source != "request"}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gateway_pb2_grpc.PredictionServiceStub(channel)
        with contextlib.suppress(grpc.aio.AioRpcError):  # any outcome is counted
            await stub.Predict(
                gateway_pb2.PredictRequest(model=demo.MODEL_NAME, entities=entities), timeout=10
            )


def _cassandra_env(request: pytest.FixtureRequest, prefix: str, keyspace: str) -> Env:
    cassandra = request.getfixturevalue("cassandra_server")
    return {
        f"{prefix}CASSANDRA_CONTACT_POINTS": ",".join(cassandra.contact_points),
        f"{prefix}CASSANDRA_PORT": str(cassandra.port),
        f"{prefix}CASSANDRA_KEYSPACE": keyspace,
        **cassandra_admin_env(cassandra.config, f"{prefix}CASSANDRA"),
        f"{prefix}CASSANDRA_WRITE_CONSISTENCY": "ONE",
    }


def _features_env(request: pytest.FixtureRequest, tmp: Path) -> Env:
    redis = request.getfixturevalue("redis_server")
    return {
        **_cassandra_env(request, "INFERGRID_FEATURES_", f"deploy_features_{os.getpid()}"),
        "INFERGRID_FEATURES_REDIS_URL": redis.url,
        "INFERGRID_FEATURES_CACHE_KEY_PREFIX": f"deploy{os.getpid()}:",
    }


def _consumer_env(
    request: pytest.FixtureRequest, prefix: str, names: tuple[str, str, str], topic: str
) -> Env:
    """A Kafka consumer's bootstrap servers and credentials (the administrator's: the topics and group are
    its own), and its topic, dead-letter topic and group (variables `names`)."""
    from stack.kafka import credential_env

    kafka = request.getfixturevalue("kafka_server")
    values = (topic, f"{topic}.dlq", topic)
    return {
        f"{prefix}KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        **credential_env(kafka.config, "admin", prefix),
        **{f"{prefix}{name}": value for name, value in zip(names, values, strict=True)},
    }


def _logging_env(request: pytest.FixtureRequest, tmp: Path) -> Env:
    names = ("TOPIC", "DEAD_LETTER_TOPIC", "CONSUMER_GROUP")
    return {
        **_cassandra_env(request, "INFERGRID_LOGGING_", f"deploy_logging_{os.getpid()}"),
        **_consumer_env(request, "INFERGRID_LOGGING_", names, f"deploy-metrics-{os.getpid()}"),
        "INFERGRID_LOGGING_TOPIC_PARTITIONS": "1",
        "INFERGRID_LOGGING_LAKE_DIR": str(tmp / "lake"),
    }


def _features_ingest_env(request: pytest.FixtureRequest, tmp: Path) -> Env:
    """The feature stream ingester on the features service's backends and a topic of its own."""
    names = ("STREAM_TOPIC", "STREAM_DEAD_LETTER_TOPIC", "STREAM_GROUP_ID")
    topic = f"deploy-features-stream-{os.getpid()}"
    return {**_features_env(request, tmp), **_consumer_env(request, "INFERGRID_FEATURES_", names, topic)}


# A realistic call per service, so that its per-request series exist (others get a generic call).
EXERCISES: dict[str, Callable[[int], Coroutine[Any, Any, None]]] = {"gateway": _predict}

# How to start each service with what it needs (only the services whose HPAs use custom metrics run).
STARTERS: dict[str, Callable[[pytest.FixtureRequest, Path], Env]] = {
    "inference": _inference_env,
    "gateway": _gateway_env,
    "features": _features_env,
    "logging": _logging_env,
    "features-ingest": _features_ingest_env,
}


class Running:
    """A service (or worker) process on free ports; its logs are kept for failure messages."""

    def __init__(self, name: str, env: Env) -> None:
        worker = WORKERS.get(name)
        code = service_code(worker.service if worker else name)
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port()
        # A worker serves no gRPC: only its metrics port, set by a variable of its own.
        metrics_variable = worker.metrics_port_variable if worker else "METRICS_PORT"
        self.proc = spawn_module(
            worker.module if worker else f"services.{name}",
            {
                f"{code.prefix}PORT": str(self.port),
                f"{code.prefix}{metrics_variable}": str(self.metrics_port),
                f"{code.prefix}DRAIN_SECONDS": "0",
                f"{code.prefix}GRACE_SECONDS": "1",
                f"{code.prefix}LOG_JSON": "false",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "",
                **env,
            },
        )

    def wait_ready(self, timeout: float = 120) -> None:
        """A service: its health SERVING; a worker: its /metrics answering (what its probes ask)."""
        if self.name not in WORKERS:
            module = __import__(f"services.{self.name}.server", fromlist=["SERVICE_NAME"])
            asyncio.run(wait_serving(self.port, module.SERVICE_NAME, self.proc, timeout=timeout))
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited early with {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"{self.name}: /metrics did not answer in {timeout:g} s")

    def scrape(self) -> dict[str, list[dict[str, str]]]:
        """Sample name -> the label sets it has."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        samples: dict[str, list[dict[str, str]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append(dict(sample.labels))
        return samples

    def output(self) -> str:
        stop_process(self.proc)
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        return err[-3000:]


def scrape_when_ready(prometheus: Prometheus, running: Sequence[Running]) -> None:
    """Waits for every process to be ready, then gives their metrics ports to Prometheus (pods `<name>-0`)."""
    for service in running:
        service.wait_ready()
    targets = [(f"{s.name}-0", s.name, f"127.0.0.1:{s.metrics_port}") for s in running]
    write_targets(prometheus.config, "static", targets)


async def _call_any_unary_method(port: int, service_name: str) -> None:
    """One call of a unary method of `service_name` with an empty request (its status does not matter)."""
    service = descriptor_pool.Default().FindServiceByName(service_name)
    method = next(m for m in service.methods if not m.client_streaming and not m.server_streaming)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{service_name}/{method.name}")
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call(b"", timeout=5)
