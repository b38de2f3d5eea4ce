"""The whole stack for the end-to-end tests, started once per module through the stack code, on free ports.

The servers (Redis, Cassandra, Kafka, Jaeger) come from the session fixtures (tests/stack_fixtures.py); the
InferGrid services, the control plane and Envoy are the very components `make up` starts
(`stack.registry.COMPONENTS`), in the session's state folder, on the session's free ports, with a platform
file of the test's own: two gateway replicas, a second tenant and model, a small rate-limit tier, and
admission (API keys, rate limits) in the gateway as in deploy/local/platform.yaml. The edge placement
(Envoy's ext_authz and rate-limit calls to services/edge) is tested end to end in tests/integration/edge.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from libs.testing import HttpAnswer, http_call
from services.edge.keys import add_key
from stack.cassandra import Cassandra
from stack.component import Component
from stack.config import StackConfig
from stack.jaeger import Jaeger
from stack.kafka import Kafka
from stack.ports import find_free_ports
from stack.probes import http_get
from stack.progress import Progress
from stack.redis import Redis
from stack.registry import COMPONENTS
from stack.services import gateway, keys_file, model_repository
from tests.stack_fixtures import REUSE_VARIABLE, StackSession, _truthy

SERVICES = ("inference", "features", "logging", "gateway", "edge", "controlplane", "envoy")

PLATFORM = """
listener: {{host: 127.0.0.1, port: {public}, max_request_bytes: {max_bytes}}}
gateway:
  endpoints: [{endpoints}]
  timeout_ms: 3000
  retry: {{retry_on: "reset,connect-failure,refused-stream,unavailable", num_retries: 3, per_try_timeout_ms: 1500, budget_percent: 50}}
  health_check: {{interval_ms: 300, timeout_ms: 250, unhealthy_threshold: 1, healthy_threshold: 1}}
  outlier_detection: {{consecutive_5xx: 3, consecutive_gateway_failure: 2, base_ejection_time_ms: 5000}}
admission: {{placement: gateway}}
api_keys_file: keys.yaml
rate_limit_tiers:
  standard: {{requests_per_second: 2000, burst: 4000}}
  small: {{requests_per_second: 1, burst: 5}}
tenants:
  demo: {{tier: standard, models: [fraud]}}
  acme: {{tier: standard, models: ["*"]}}
  limited: {{tier: small, models: [fraud]}}
models:
  fraud:
    versions: [{{version: "1", weight: {w1}}}, {{version: "2", weight: {w2}}}]
    sticky_key: user_id
{shadow}  ranker:
    versions: [{{version: "1", weight: 100}}]
"""
PLATFORM_DEFAULTS: dict[str, Any] = {"max_bytes": 131072, "w1": 90, "w2": 10, "shadow": ""}


@dataclass
class Stack:
    """The running whole stack: components by name, keys by tenant, the platform file and clients."""

    config: StackConfig
    components: dict[str, Component]
    keys: dict[str, str]
    gateway_ports: list[int]
    platform_values: dict[str, Any] = field(default_factory=dict)
    channel: grpc.Channel = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.target)

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.config.port('envoy')}"

    @property
    def repo(self) -> Path:
        return model_repository(self.config)

    def address(self, name: str) -> str:
        return f"{self.config.host}:{self.components[name].port}"

    def platform_text(self, **overrides: Any) -> str:
        values = {**PLATFORM_DEFAULTS, **overrides}
        endpoints = ", ".join(f'"127.0.0.1:{p}"' for p in self.gateway_ports)
        shadow = f'    shadow: "{values.pop("shadow")}"\n' if values.get("shadow") else ""
        values.pop("shadow", None)
        return PLATFORM.format(public=self.config.port("envoy"), endpoints=endpoints, shadow=shadow, **values)

    def write_platform(self, text: str) -> None:
        tmp = self.config.platform_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config.platform_file)

    def reset_platform(self) -> None:
        self.write_platform(self.platform_text())

    def stub(self) -> gateway_pb2_grpc.PredictionServiceStub:
        return gateway_pb2_grpc.PredictionServiceStub(self.channel)

    def predict(
        self, request: gateway_pb2.PredictRequest, key: str | None, timeout: float = 5.0
    ) -> gateway_pb2.PredictResponse:
        metadata = [("x-api-key", key)] if key else []
        return self.stub().Predict(request, metadata=metadata, timeout=timeout)

    def http(self, path: str, body: bytes | str, headers: Mapping[str, str] | None = None) -> HttpAnswer:
        return http_call(f"http://{self.target}{path}", body, headers)

    def envoy_config_dump(self) -> str:
        envoy = self.components["envoy"]
        answer = http_get(f"http://{envoy.host}:{envoy.ports['envoy_admin']}/config_dump", timeout_s=5)
        assert answer is not None and answer.status == 200
        return answer.body

    @staticmethod
    def wait_for(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = check()
            except grpc.RpcError as exc:
                last = exc
            else:
                if last:
                    return last
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture(scope="module")
def whole_stack(
    stack: StackSession,
    redis_server: Redis,
    cassandra_server: Cassandra,
    kafka_server: Kafka,
    jaeger_server: Jaeger,
) -> Iterator[Stack]:
    """Every component of `make up` (the second gateway replica too), once for the module."""
    if _truthy(os.environ.get(REUSE_VARIABLE)):
        pytest.skip(
            f"{REUSE_VARIABLE} borrows the developer's servers; a second set of services on them would "
            "share their consumer group and keyspaces"
        )
    second_port, second_metrics = find_free_ports(
        stack.config.host, 2, exclude=set(stack.config.ports.values())
    )
    folder = stack.config.state_dir / "e2e"
    folder.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(stack.config, platform_file=folder / "platform.yaml")
    keys = {tenant: f"ig_e2e_{tenant}_{uuid.uuid4().hex}" for tenant in ("demo", "acme", "limited")}
    for tenant, key in keys.items():
        add_key(keys_file(config), tenant, f"e2e-{tenant}", key)
    result = Stack(
        config=config,
        components={
            "redis": redis_server,
            "cassandra": cassandra_server,
            "kafka": kafka_server,
            "jaeger": jaeger_server,
        },
        keys=keys,
        gateway_ports=[config.port("gateway"), second_port],
    )
    result.reset_platform()
    started: list[Component] = []  # only the module's own; the servers belong to the session
    try:
        for name in SERVICES:
            component = COMPONENTS[name](config)
            started.append(component)
            result.components[name] = component
            component.start(Progress(component.name))
            if name == "gateway":
                replica = gateway(
                    config,
                    name="gateway-2",
                    ports={"gateway": second_port, "gateway_metrics": second_metrics},
                )
                started.append(replica)
                result.components["gateway-2"] = replica
                replica.start(Progress(replica.name))
        yield result
    finally:
        result.channel.close()
        for component in reversed(started):
            try:
                component.stop()
            except Exception as exc:  # keep stopping the others
                print(f"[e2e] {component.name}: stop failed: {exc}")
