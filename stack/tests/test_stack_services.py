"""The InferGrid service components and what `make up` prints, without running anything."""

import json
import shlex
from pathlib import Path

import pytest

from stack.config import StackConfig
from stack.demo import demo_json_body, how_to_call
from stack.ports import DEFAULT_PORTS
from stack.registry import COMPONENTS, select
from stack.services import gateway, input_layouts, model_repository

SERVICES = ("inference", "features", "logging", "gateway", "edge", "controlplane")


@pytest.fixture
def config(tmp_path: Path) -> StackConfig:
    return StackConfig.from_env(
        {
            "INFERGRID_STATE_DIR": str(tmp_path),
            "INFERGRID_CACHE_DIR": str(tmp_path),
            "INFERGRID_GATEWAY_PORT": "15051",
            "INFERGRID_KAFKA_PORT": "19092",
            "INFERGRID_JAEGER_OTLP_GRPC_PORT": "14317",
            "INFERGRID_PLATFORM_FILE": str(tmp_path / "platform.yaml"),
        }
    )


def test_services_start_after_their_servers_and_before_envoy() -> None:
    order = list(COMPONENTS)
    for service in SERVICES:
        assert order.index("jaeger") < order.index(service) < order.index("envoy")
    assert order.index("inference") < order.index("gateway") and order.index("features") < order.index(
        "gateway"
    )
    assert order.index("edge") < order.index("controlplane")


def test_every_service_port_has_a_default_and_the_services_read_the_stack_ports(config: StackConfig) -> None:
    by_name = {c.name: c for c in select(config, SERVICES)}
    for name, component in by_name.items():
        assert set(component.port_names) <= set(DEFAULT_PORTS), name
        env = component.environment()
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:14317", name
        assert env[f"INFERGRID_{name.upper()}_PORT"] == str(component.port), name
    gw = by_name["gateway"].environment()
    assert by_name["gateway"].port == 15051
    assert gw["INFERGRID_GATEWAY_KAFKA_BOOTSTRAP_SERVERS"] == "127.0.0.1:19092"
    assert gw["INFERGRID_GATEWAY_INPUT_LAYOUTS"] == str(input_layouts(config))
    assert "INFERGRID_GATEWAY_MODEL_REPOSITORY" not in gw  # the gateway asks the inference API instead
    assert gw["INFERGRID_GATEWAY_PLATFORM_FILE"] == str(config.platform_file)
    assert by_name["inference"].environment()["INFERGRID_INFERENCE_MODEL_REPOSITORY"] == str(
        model_repository(config)
    )


def test_a_second_gateway_replica_has_its_own_ports_and_spool(config: StackConfig) -> None:
    second = gateway(config, name="gateway-2", ports={"gateway": 15052, "gateway_metrics": 19111})
    env = second.environment()
    assert second.port == 15052 and env["INFERGRID_GATEWAY_PORT"] == "15052"
    assert env["INFERGRID_GATEWAY_METRICS_PORT"] == "19111"
    assert env["INFERGRID_GATEWAY_INFERENCE_LOG_SPOOL_DIR"].endswith("gateway-2/spool")


def test_up_prints_a_curl_with_the_key_and_a_body_of_the_demo_model(config: StackConfig) -> None:
    text = how_to_call(config, select(config, []), minted_key="ig_example")
    assert "export INFERGRID_DEMO_API_KEY=ig_example" in text
    assert f"http://127.0.0.1:{config.port('envoy')}/v1/models/fraud:predict" in text
    assert "examples/predict_client.py" in text and "grpcurl" in text
    assert f"http://127.0.0.1:{config.port('jaeger_query')}/api/traces" in text
    body = demo_json_body()
    assert set(body["entities"]) == {"user_id", "merchant_id", "device_id"}  # type: ignore[arg-type]
    curl = text[text.index("curl") :].split("\n\n")[0].replace("\\\n", " ")
    sent = shlex.split(curl)[shlex.split(curl).index("-d") + 1]
    assert json.loads(sent) == body


def test_nothing_to_call_without_envoy_and_the_gateway(config: StackConfig) -> None:
    assert how_to_call(config, select(config, ["redis", "kafka"])) == ""


def test_replicas_of_the_cluster_profile_drain_longer_than_the_single_stack(tmp_path: Path) -> None:
    """A cluster replica stays in NOT_SERVING long enough for discovery and EDS to route around it."""

    def drain(profile: str) -> float:
        config = StackConfig.from_env(
            {"INFERGRID_STATE_DIR": str(tmp_path / profile), "INFERGRID_CACHE_DIR": str(tmp_path)},
            profile=profile,
        )
        return float(gateway(config).environment()["INFERGRID_GATEWAY_DRAIN_SECONDS"])

    assert drain("single") == 1.0
    assert drain("cluster") >= 5.0
