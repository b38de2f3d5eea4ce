"""A real edge for the tests: Envoy fed over ADS by the control plane, the edge service on Redis, two stand-in gateways.

Everything runs as its own process on loopback with free ports, from a temporary folder holding the
platform file and the hashed keys; the tests talk to Envoy the way clients do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from libs.checkout import checkout_env
from libs.testing import HttpAnswer, http_call
from services.edge.keys import add_key
from stack.config import REPO_ROOT
from stack.envoy import Envoy
from stack.jaeger import Jaeger
from stack.ports import find_free_ports
from stack.probes import grpc_health_serving, http_get
from stack.progress import Progress
from stack.redis import Redis
from tests.stack_fixtures import StackSession, session_state_dir

BOOTSTRAP = REPO_ROOT / "deploy" / "local" / "envoy" / "envoy.yaml"
DESCRIPTORS = REPO_ROOT / "build" / "gen" / "descriptors.pb"

PLATFORM = """
listener: {{host: 127.0.0.1, port: {public}, max_request_bytes: {max_bytes}}}
gateway:
  endpoints: [{endpoints}]
  timeout_ms: {timeout_ms}
  retry: {{retry_on: "reset,connect-failure,refused-stream,unavailable", num_retries: 3, per_try_timeout_ms: 1000}}
  health_check: {{interval_ms: 300, timeout_ms: 250, unhealthy_threshold: 1, healthy_threshold: 1}}
  outlier_detection: {{consecutive_5xx: 3, consecutive_gateway_failure: 2, base_ejection_time_ms: 5000}}
api_keys_file: keys.yaml
rate_limit_tiers:
  big: {{requests_per_second: 1000, burst: 1000}}
  small: {{requests_per_second: {small_rps}, burst: {small_burst}}}
tenants:
  acme: {{tier: big, models: [fraud]}}
  limited: {{tier: small, models: ["*"]}}
  orphan_models: {{tier: big, models: []}}
models:
  fraud:
    versions: [{{version: "1", weight: 100}}]
  ranker:
    versions: [{{version: "1", weight: 100}}]
"""
PLATFORM_DEFAULTS: dict[str, Any] = {
    "max_bytes": 65536,
    "timeout_ms": 2000,
    "small_rps": 1,
    "small_burst": 5,
}


@dataclass
class Process:
    """A process started by the fixture, its log file and its port."""

    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _spawn(module: str, env: Mapping[str, str], log: Path, port: int) -> Process:
    full_env = checkout_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "", **env})
    handle = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", module], cwd=REPO_ROOT, env=full_env, stdout=handle, stderr=subprocess.STDOUT
    )
    handle.close()
    return Process(proc, log, port)


def _wait_serving(process: Process, service: str = "", timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise AssertionError(f"{process.log.name} exited: {process.log_text()[-3000:]}")
        if grpc_health_serving("127.0.0.1", process.port, service, timeout_s=0.5):
            return
        time.sleep(0.1)
    raise AssertionError(f"{process.log.name} never became SERVING: {process.log_text()[-3000:]}")


@dataclass
class EdgeStack:
    """The running edge: where to call it, its keys, and handles to change or break it."""

    folder: Path
    platform_file: Path
    public_port: int
    envoy: Envoy
    controlplane: Process
    edge: Process
    upstreams: dict[str, Process]
    keys: dict[str, str]
    controlplane_metrics_port: int = 0
    jaeger_query_url: str = ""
    controlplane_env: dict[str, str] = field(default_factory=dict)
    platform_values: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.public_port}"

    def platform_text(self, **overrides: Any) -> str:
        values = {**PLATFORM_DEFAULTS, **overrides}
        endpoints = values.pop("endpoints", None) or ", ".join(
            f'"127.0.0.1:{u.port}"' for u in self.upstreams.values()
        )
        return PLATFORM.format(public=self.public_port, endpoints=endpoints, **values)

    def write_platform(self, text: str) -> None:
        tmp = self.platform_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.platform_file)

    def reset_platform(self) -> None:
        self.write_platform(self.platform_text())
        self.wait_applied()

    def wait_applied(self, timeout: float = 15.0) -> None:
        """Waits until Envoy's listeners carry the version made from the platform file as it is now."""
        digest = hashlib.sha256(self.platform_file.read_text().encode()).hexdigest()[:16]
        self.wait_for(
            lambda: (
                self.stats("listener_manager.lds.version_text")
                .get("listener_manager.lds.version_text", "")
                .strip('"')
                .endswith(f"-{digest}")
            ),
            timeout=timeout,
            what=f"Envoy to apply platform version {digest}",
        )

    def stub(self) -> gateway_pb2_grpc.PredictionServiceStub:
        return gateway_pb2_grpc.PredictionServiceStub(self.channel)

    channel: grpc.Channel = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.target)

    def predict(
        self, model: str = "fraud", key: str | None = None, timeout: float = 5.0, **entities: str
    ) -> gateway_pb2.PredictResponse:
        metadata = [("x-api-key", key)] if key else []
        return self.stub().Predict(
            gateway_pb2.PredictRequest(model=model, entities=entities), metadata=metadata, timeout=timeout
        )

    def http(
        self, path: str, body: bytes | str, headers: Mapping[str, str] | None = None, method: str = "POST"
    ) -> HttpAnswer:
        return http_call(f"http://{self.target}{path}", body, headers, method)

    def config_dump(self) -> dict[str, Any]:
        answer = http_get(f"{self.envoy.admin_url}/config_dump", timeout_s=5)
        assert answer is not None and answer.status == 200
        return dict(json.loads(answer.body))

    def stats(self, prefix: str = "") -> dict[str, str]:
        answer = http_get(f"{self.envoy.admin_url}/stats?filter={prefix}", timeout_s=5)
        assert answer is not None
        out = {}
        for line in answer.body.splitlines():
            name, _, value = line.partition(": ")
            out[name] = value
        return out

    def wait_for(self, check: Any, timeout: float = 10.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture(scope="session")
def edge_stack(
    stack: StackSession, redis_server: Redis, jaeger_server: Jaeger, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EdgeStack]:
    """Starts the whole edge once per session; tests that change the platform file restore it."""
    if not DESCRIPTORS.exists():
        pytest.fail("build/gen/descriptors.pb is missing: run `make gen`")
    folder = tmp_path_factory.mktemp("edge")
    public, admin, xds, edge_port, up1, up2, cp_metrics = find_free_ports("127.0.0.1", 7)
    started: list[Process] = []
    envoy: Envoy | None = None
    result: EdgeStack | None = None
    try:
        upstreams = {}
        for name, port in (("replica-a", up1), ("replica-b", up2)):
            upstreams[name] = _spawn(
                "tests.integration.edge.upstream",
                {"UPSTREAM_PORT": str(port), "UPSTREAM_NAME": name},
                folder / f"{name}.log",
                port,
            )
            started.append(upstreams[name])
        platform_file = folder / "platform.yaml"
        endpoints = ", ".join(f'"127.0.0.1:{u.port}"' for u in upstreams.values())
        platform_file.write_text(PLATFORM.format(public=public, endpoints=endpoints, **PLATFORM_DEFAULTS))
        keys = {}
        for tenant in ("acme", "limited", "orphan_models"):
            keys[tenant] = f"ig_test_{tenant}_{uuid.uuid4().hex}"
            add_key(folder / "keys.yaml", tenant, tenant, keys[tenant])
        edge = _spawn(
            "services.edge",
            {
                "INFERGRID_EDGE_PORT": str(edge_port),
                "INFERGRID_EDGE_PLATFORM_FILE": str(platform_file),
                "INFERGRID_EDGE_REDIS_URL": redis_server.url,
                "INFERGRID_EDGE_POLL_SECONDS": "0.2",
                "INFERGRID_EDGE_KEY_PREFIX": f"infergrid-test:{uuid.uuid4().hex[:8]}",
                "INFERGRID_EDGE_METRICS_PORT": "0",
                "INFERGRID_EDGE_DRAIN_SECONDS": "0",
            },
            folder / "edge.log",
            edge_port,
        )
        controlplane_env = {
            "INFERGRID_CONTROLPLANE_PORT": str(xds),
            "INFERGRID_CONTROLPLANE_PLATFORM_FILE": str(platform_file),
            "INFERGRID_CONTROLPLANE_PLATFORM_POLL_SECONDS": "0.2",
            "INFERGRID_CONTROLPLANE_DESCRIPTOR_SET": str(DESCRIPTORS),
            "INFERGRID_CONTROLPLANE_EDGE_ADDRESS": f"127.0.0.1:{edge_port}",
            "INFERGRID_CONTROLPLANE_ACCESS_LOG": str(folder / "access.log"),
            "INFERGRID_CONTROLPLANE_METRICS_PORT": str(cp_metrics),
            "INFERGRID_CONTROLPLANE_TLS_DIR": str(folder / "tls"),
            "INFERGRID_CONTROLPLANE_TRACING_OTLP_ADDRESS": jaeger_server.otlp_grpc_endpoint,
        }
        controlplane = _spawn("services.controlplane", controlplane_env, folder / "controlplane.log", xds)
        result = EdgeStack(
            folder=folder,
            platform_file=platform_file,
            public_port=public,
            envoy=None,  # type: ignore[arg-type]  # set below, once the platform file exists
            controlplane=controlplane,
            edge=edge,
            upstreams=upstreams,
            keys=keys,
            controlplane_metrics_port=cp_metrics,
            jaeger_query_url=jaeger_server.query_url,
            controlplane_env=controlplane_env,
        )
        started.extend([edge, controlplane])
        for process in (*upstreams.values(), edge, controlplane):
            _wait_serving(process)
        config = dataclasses.replace(stack.config, state_dir=session_state_dir())
        envoy = Envoy(
            config,
            name=f"envoy-edge-test-{os.getpid()}",
            ports={"envoy": public, "envoy_admin": admin},
            bootstrap=BOOTSTRAP,
            variables={"CONTROLPLANE_HOST": "127.0.0.1", "CONTROLPLANE_PORT": xds, "NODE_ID": "edge-test"},
        )
        envoy.start(Progress(envoy.name))
        result.envoy = envoy
        yield result
    finally:
        if envoy is not None:
            envoy.stop()
        if result is not None:
            started.extend(p for p in (*result.upstreams.values(), result.controlplane) if p not in started)
        for process in reversed(started):
            process.stop()
