"""No generated secret appears in any log, trace or error message of the real stack after traffic.

The whole stack (tests/e2e/whole_stack.py: Envoy, control plane, edge, two gateways, features, inference,
logging on the session's Redis, Cassandra, Kafka and Jaeger) runs with the backends' generated passwords
(`<state>/secrets/*`, passed to the services as `*_FILE` variables). After OK calls, refused calls and
malformed calls, every password is looked for in every file under the logs folder (all servers and
services, Envoy's access log), the pid records, every trace Jaeger holds and every answer the callers saw.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from urllib.parse import quote

import grpc
import pytest

from infergrid.gateway.v1 import gateway_pb2
from infergrid.types.v1.value_pb2 import Value
from stack.demo import DEMO_REQUEST_FEATURES
from stack.jaeger import Jaeger
from stack.probes import http_get
from tests.e2e.whole_stack import Stack, whole_stack

__all__ = ["whole_stack"]

pytestmark = pytest.mark.integration

ENTITIES = {"user_id": "u00001", "merchant_id": "m0001", "device_id": "d00001"}


def _secrets(secrets_dir: Path) -> dict[str, str]:
    """Every generated secret of the stack by name."""
    return {
        path.name: path.read_text().strip()
        for path in sorted(secrets_dir.iterdir())
        if path.is_file() and not path.name.startswith(".")
    }


def _traffic(stack: Stack) -> list[str]:
    """OK, refused and malformed calls through Envoy; returns what the callers were told."""
    told: list[str] = []
    for i in range(20):
        request = gateway_pb2.PredictRequest(
            model="fraud",
            request_id=f"leak-{uuid.uuid4().hex}",
            entities={**ENTITIES, "user_id": f"u{i:05d}"},
            features={name: Value(double_value=v) for name, v in DEMO_REQUEST_FEATURES.items()},
        )
        for key in (stack.keys["demo"], None, "ig_unknown_key", stack.keys["demo"] + "x"):
            try:
                answer = stack.predict(request, key, timeout=10)
                told.append(str(answer))
            except grpc.RpcError as exc:
                told.append(f"{exc.code()} {exc.details()}")  # type: ignore[attr-defined]
    for body in ('{"entities": {"user_id": {"nested": 1}}}', "not json", '{"request_id": "../../etc"}'):
        answer = stack.http("/v1/models/fraud:predict", body, {"x-api-key": stack.keys["demo"]})
        told.append(f"{answer.status} {answer.body}")
    return told


def _traces(jaeger: Jaeger) -> str:
    """Every trace Jaeger holds for every service, as its JSON."""
    services = http_get(f"{jaeger.query_url}/api/services", timeout_s=10)
    assert services is not None and services.status == 200
    names = json.loads(services.body)["data"] or []
    bodies = []
    for name in names:
        answer = http_get(f"{jaeger.query_url}/api/traces?service={quote(name)}&limit=1000", timeout_s=30)
        assert answer is not None and answer.status == 200, name
        bodies.append(answer.body)
    return "\n".join(bodies)


def test_no_generated_secret_in_logs_traces_or_answers(whole_stack: Stack) -> None:
    config = whole_stack.config
    secrets = _secrets(config.secrets_dir)
    # The stack generated the backends' passwords and the services use them (else the test proves nothing).
    assert {"redis-default", "redis-gateway", "redis-features", "redis-edge"} <= set(secrets)
    assert {"cassandra-admin", "cassandra-features", "cassandra-logging"} <= set(secrets)
    told = _traffic(whole_stack)
    assert any("fraud_probability" in answer for answer in told), told[:4]
    assert any("UNAUTHENTICATED" in answer for answer in told)

    jaeger = whole_stack.components["jaeger"]
    assert isinstance(jaeger, Jaeger)
    traces = Stack.wait_for(
        lambda: (t := _traces(jaeger)) and '"gateway"' in t and t, 30, "the gateway's traces"
    )
    files = [
        p for folder in (config.log_dir, config.run_dir) for p in sorted(folder.rglob("*")) if p.is_file()
    ]
    logs = {str(p): p.read_text(errors="replace") for p in files}
    for service in (
        "gateway",
        "gateway-2",
        "edge",
        "features",
        "logging",
        "inference",
        "controlplane",
        "envoy",
    ):
        assert logs.get(str(config.log_dir / f"{service}.log")), f"no log of {service}"

    places = {**logs, "jaeger traces": traces, "answers to callers": "\n".join(told)}
    found = [
        (name, where) for name, value in secrets.items() for where, text in places.items() if value in text
    ]
    print(
        f"\n[secrets] {len(secrets)} generated secrets looked for in {len(logs)} log and pid files "
        f"({sum(len(t) for t in logs.values()):,} characters), {len(traces):,} characters of traces and "
        f"{len(told)} answers: {len(found)} found"
    )
    assert found == []
