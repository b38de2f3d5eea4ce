"""A real Envoy on the real control plane follows a discovery file: an added gateway replica appears in
Envoy's /clusters within seconds, pushed over EDS alone (no cluster or listener update)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from libs.checkout import checkout_env
from stack.config import REPO_ROOT
from stack.ports import find_free_ports
from stack.probes import grpc_health_serving, http_get
from tests.stack_fixtures import EnvoyFactory

pytestmark = pytest.mark.integration

BOOTSTRAP = REPO_ROOT / "deploy" / "local" / "envoy" / "envoy.yaml"
DESCRIPTORS = REPO_ROOT / "build" / "gen" / "descriptors.pb"
PREDICTION_SERVICE = "infergrid.gateway.v1.PredictionService"


@pytest.fixture
def replicas() -> Iterator[list[int]]:
    """Two stand-in gateway replicas: gRPC servers whose health says PredictionService is SERVING."""
    servers, ports = [], []
    for _ in range(2):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        servicer.set(PREDICTION_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    try:
        yield ports
    finally:
        for server in servers:
            server.stop(0)


def _write(path: Path, ports: list[int]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"endpoints": [f"127.0.0.1:{p}" for p in ports]}))
    tmp.replace(path)


def _wait(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_envoy_picks_up_a_replica_added_to_the_discovery_file(
    envoy_factory: EnvoyFactory, replicas: list[int], tmp_path: Path
) -> None:
    if not DESCRIPTORS.exists():
        pytest.fail("build/gen/descriptors.pb is missing: run `make gen`")
    public, xds = find_free_ports("127.0.0.1", 2)
    endpoints = tmp_path / "gateway-endpoints.json"
    _write(endpoints, replicas[:1])
    platform = tmp_path / "platform.yaml"
    platform.write_text(
        f"listener: {{host: 127.0.0.1, port: {public}}}\n"
        'gateway: {endpoints: ["file:gateway-endpoints.json"]}\n'
        "admission: {placement: gateway}\n"
    )
    env = {
        **checkout_env(),
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "INFERGRID_CONTROLPLANE_PORT": str(xds),
        "INFERGRID_CONTROLPLANE_METRICS_PORT": "0",
        "INFERGRID_CONTROLPLANE_PLATFORM_FILE": str(platform),
        "INFERGRID_CONTROLPLANE_DESCRIPTOR_SET": str(DESCRIPTORS),
        "INFERGRID_CONTROLPLANE_ENDPOINTS_POLL_SECONDS": "0.2",
        "INFERGRID_CONTROLPLANE_ACCESS_LOG": "",
        "INFERGRID_CONTROLPLANE_TLS_DIR": str(tmp_path / "tls"),
    }
    log = (tmp_path / "controlplane.log").open("wb")
    controlplane = subprocess.Popen(
        [sys.executable, "-m", "services.controlplane"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log
    )
    try:
        _wait(lambda: grpc_health_serving("127.0.0.1", xds, timeout_s=0.5), 30, "the control plane")
        envoy = envoy_factory(BOOTSTRAP, {"CONTROLPLANE_PORT": xds, "CONTROLPLANE_HOST": "127.0.0.1"})

        def _clusters() -> str:
            answer = http_get(f"{envoy.admin_url}/clusters", timeout_s=2)
            return answer.body if answer is not None else ""

        def _stat(name: str) -> int:
            answer = http_get(f"{envoy.admin_url}/stats?filter=^{name}$", timeout_s=2)
            assert answer is not None
            return int(answer.body.partition(": ")[2] or 0)

        first, second = (f"gateway::127.0.0.1:{port}::" for port in replicas)
        _wait(lambda: f"{first}health_flags::healthy" in _clusters(), 10, "the first replica, healthy")
        assert second not in _clusters()
        cds, lds = _stat("cluster_manager.cds.update_success"), _stat("listener_manager.lds.update_success")
        assert cds >= 1 and lds >= 1

        _write(endpoints, replicas)
        _wait(lambda: f"{second}health_flags::healthy" in _clusters(), 10, "the added replica, healthy")

        assert f"{first}health_flags::healthy" in _clusters()
        # Only EDS moved: Envoy neither re-warmed its clusters nor drained its listener.
        assert _stat("cluster_manager.cds.update_success") == cds
        assert _stat("listener_manager.lds.update_success") == lds
        assert "cluster gateway endpoints" in (tmp_path / "controlplane.log").read_text()

        _write(endpoints, replicas[1:])
        _wait(lambda: first not in _clusters(), 10, "the removed replica to leave")
    finally:
        controlplane.terminate()
        controlplane.wait(10)
        log.close()
