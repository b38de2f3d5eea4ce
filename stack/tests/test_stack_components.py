"""Components without running servers: templates, the status table, Kafka cluster ids, the registry."""

from pathlib import Path

import pytest

from stack.component import ComponentStatus
from stack.config import StackConfig
from stack.envoy import Envoy
from stack.errors import StackError
from stack.jaeger import Jaeger
from stack.kafka import new_cluster_id
from stack.lifecycle import format_status
from stack.registry import COMPONENTS, select


@pytest.fixture
def config(tmp_path: Path) -> StackConfig:
    return StackConfig.from_env({"INFERGRID_STATE_DIR": str(tmp_path), "INFERGRID_CACHE_DIR": str(tmp_path)})


def test_envoy_bootstrap_renders_ports_and_extra_variables(config: StackConfig) -> None:
    envoy = Envoy(
        config,
        ports={"envoy": 18080, "envoy_admin": 19901},
        bootstrap=config.deploy_dir / "envoy" / "static-route.yaml",
        variables={"UPSTREAM_PORT": 18000},
    )
    envoy.prepare()
    text = envoy.config_path.read_text()
    assert "port_value: 18080" in text
    assert "port_value: 19901" in text
    assert "port_value: 18000" in text
    assert "${" not in text


def test_missing_template_variable_is_a_stack_error(config: StackConfig) -> None:
    envoy = Envoy(config, bootstrap=config.deploy_dir / "envoy" / "static-route.yaml")
    with pytest.raises(StackError, match="UPSTREAM_PORT"):
        envoy.prepare()


def test_jaeger_version_comes_from_the_pinned_module(config: StackConfig) -> None:
    assert Jaeger(config).version.startswith("1.")
    assert Jaeger(config).binary.name == f"jaeger-{Jaeger(config).version}"


def test_kafka_cluster_ids_look_like_kafka_uuids() -> None:
    ids = {new_cluster_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


def test_status_table_has_one_row_per_component() -> None:
    table = format_status(
        [
            ComponentStatus("redis", 42, {"redis": 6379}, "healthy", 65.0),
            ComponentStatus("kafka", None, {"kafka": 9092, "kafka_controller": 9093}, "stopped", None),
        ]
    )
    lines = table.splitlines()
    assert lines[0].split() == ["COMPONENT", "PID", "PORT", "HEALTH", "UPTIME"]
    assert lines[1].split() == ["redis", "42", "6379", "healthy", "1m05s"]
    assert lines[2].split() == ["kafka", "-", "9092,9093", "stopped", "-"]


def test_select_keeps_start_order_and_rejects_unknown_names(config: StackConfig) -> None:
    assert [c.name for c in select(config, [])] == list(COMPONENTS)
    assert [c.name for c in select(config, ["envoy", "redis"])] == ["redis", "envoy"]
    with pytest.raises(StackError, match="known: redis"):
        select(config, ["mongo"])
