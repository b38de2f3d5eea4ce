"""The HPAs' custom metrics exist: each adapter rule's series is exported by the real, running service.

For every service whose HPA scales on a custom metric, the test starts `python -m services.<name>`
(with the real backends it needs from the stack fixtures: Kafka and Cassandra for logging, Redis and
Cassandra for features, a demo model repository for inference, a real inference process for the
gateway), makes one call of the service's API so that the per-request series exist, scrapes its /metrics port, and looks for the series named in the rule's
`seriesQuery` with the label values the rule filters on.
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
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from prometheus_client.parser import text_string_to_metric_families

from libs.testing import REPO_ROOT, free_port, spawn_module, stop_process, wait_serving
from tests.deploy.k8s_objects import PYTHON_SERVICES, WORKERS, Rendered, adapter_rules, service_code

pytestmark = pytest.mark.integration

Env = dict[str, str]
_MATCHER = re.compile(r'(\w+)\s*(=|!=|=~|!~)\s*"([^"]*)"')


def _series(query: str) -> tuple[str, dict[str, str]]:
    """("grpc_server_handled_total", {"grpc_service": "..."}) from a seriesQuery (equality matchers only)."""
    name, _, rest = query.partition("{")
    labels = {k: v for k, op, v in _MATCHER.findall(rest) if op == "=" and v}
    return name.strip(), labels


def _custom_metrics(overlays: dict[str, Rendered], service: str) -> set[str]:
    names = set()
    for rendered in overlays.values():
        for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
            if hpa["spec"]["scaleTargetRef"]["name"] == service:
                names |= {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    return names


def _inference_env(request: pytest.FixtureRequest, tmp: Path) -> Env:
    repo = tmp / "models"
    subprocess.run(
        [sys.executable, "-m", "services.inference.demo", "--repo", str(repo)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'build' / 'gen'}"},
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
    from services.inference import demo

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
        f"{prefix}CASSANDRA_WRITE_CONSISTENCY": "ONE",
    }


def _features_env(request: pytest.FixtureRequest, tmp: Path) -> Env:
    redis = request.getfixturevalue("redis_server")
    return {
        **_cassandra_env(request, "INFERGRID_FEATURES_", f"deploy_features_{os.getpid()}"),
        "INFERGRID_FEATURES_REDIS_URL": redis.url,
        "INFERGRID_FEATURES_CACHE_KEY_PREFIX": f"deploy{os.getpid()}:",
    }


def _logging_env(request: pytest.FixtureRequest, tmp: Path) -> Env:
    kafka = request.getfixturevalue("kafka_server")
    topic = f"deploy-metrics-{os.getpid()}"
    return {
        **_cassandra_env(request, "INFERGRID_LOGGING_", f"deploy_logging_{os.getpid()}"),
        "INFERGRID_LOGGING_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "INFERGRID_LOGGING_TOPIC": topic,
        "INFERGRID_LOGGING_DEAD_LETTER_TOPIC": f"{topic}.dlq",
        "INFERGRID_LOGGING_CONSUMER_GROUP": topic,
        "INFERGRID_LOGGING_TOPIC_PARTITIONS": "1",
        "INFERGRID_LOGGING_LAKE_DIR": str(tmp / "lake"),
    }


def _features_ingest_env(request: pytest.FixtureRequest, tmp: Path) -> Env:
    """The feature stream ingester on the features service's backends and a topic of its own."""
    kafka = request.getfixturevalue("kafka_server")
    topic = f"deploy-features-stream-{os.getpid()}"
    return {
        **_features_env(request, tmp),
        "INFERGRID_FEATURES_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "INFERGRID_FEATURES_STREAM_TOPIC": topic,
        "INFERGRID_FEATURES_STREAM_DEAD_LETTER_TOPIC": f"{topic}.dlq",
        "INFERGRID_FEATURES_STREAM_GROUP_ID": topic,
    }


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


async def _call_any_unary_method(port: int, service_name: str) -> None:
    """One call of a unary method of `service_name` with an empty request (its status does not matter)."""
    service = descriptor_pool.Default().FindServiceByName(service_name)
    method = next(m for m in service.methods if not m.client_streaming and not m.server_streaming)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{service_name}/{method.name}")
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call(b"", timeout=5)


@pytest.fixture
def running(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], Running]]:
    started: list[Running] = []

    def start(name: str) -> Running:
        service = Running(name, STARTERS[name](request, tmp_path))
        started.append(service)
        return service

    yield start
    for service in started:
        stop_process(service.proc)


@pytest.mark.parametrize("name", PYTHON_SERVICES + tuple(WORKERS))
def test_hpa_metrics_are_exported_by_the_running_service(
    name: str, overlays: dict[str, Rendered], running: Callable[[str], Running]
) -> None:
    metrics = _custom_metrics(overlays, name)
    if not metrics:
        pytest.skip(f"{name}: its HPA scales on CPU only")
    code = WORKERS[name].service if name in WORKERS else name
    assert (REPO_ROOT / "services" / code / "__main__.py").exists(), f"services/{code} cannot be started"
    assert name in STARTERS, f"tests/deploy does not know how to start {name}: add it to STARTERS"
    rules = adapter_rules()
    wanted = {metric: _series(rules[metric]["seriesQuery"]) for metric in metrics}
    __import__(f"services.{code}.server", fromlist=["SERVICE_NAME"])  # registers its protos
    service = running(name)
    try:
        service.wait_ready()
        if name in EXERCISES:
            asyncio.run(EXERCISES[name](service.port))
        for _series_name, labels in wanted.values():
            if "grpc_service" in labels:
                asyncio.run(_call_any_unary_method(service.port, labels["grpc_service"]))
        deadline = time.monotonic() + 30
        missing: dict[str, tuple[str, dict[str, str]]] = dict(wanted)
        while missing and time.monotonic() < deadline:
            samples = service.scrape()
            for metric, (series, labels) in list(missing.items()):
                if any(labels.items() <= found.items() for found in samples.get(series, [])):
                    del missing[metric]
            time.sleep(0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{service.output()}") from None
    assert not missing, (
        f"{name} does not export {missing} (HPA metric -> adapter series and labels); it exports "
        f"{sorted(s for s in samples if s.startswith(('infergrid_', 'grpc_')))}"
    )
