"""StackConfig: defaults, port overrides from the environment, malformed values named."""

from pathlib import Path

import pytest

from stack.config import REPO_ROOT, StackConfig
from stack.errors import ConfigError
from stack.ports import DEFAULT_PORTS


def test_defaults_follow_the_design() -> None:
    config = StackConfig.from_env({})
    assert config.state_dir == REPO_ROOT / ".state"
    assert config.cache_dir == Path.home() / ".cache" / "infergrid"
    assert config.host == "127.0.0.1"
    assert config.port("redis") == 6379
    assert config.port("envoy_admin") == 9901
    assert dict(config.ports) == DEFAULT_PORTS


def test_environment_overrides_dirs_and_ports(tmp_path: Path) -> None:
    config = StackConfig.from_env(
        {
            "INFERGRID_STATE_DIR": str(tmp_path / "state"),
            "INFERGRID_CACHE_DIR": str(tmp_path / "cache"),
            "INFERGRID_KAFKA_CONTROLLER_PORT": "19093",
            "INFERGRID_GATEWAY_PORT": "15051",
        }
    )
    assert config.state_dir == tmp_path / "state"
    assert config.cache_dir == tmp_path / "cache"
    assert config.port("kafka_controller") == 19093
    assert config.port("gateway") == 15051  # services added later get ports the same way


def test_to_env_round_trips(tmp_path: Path) -> None:
    config = StackConfig.from_env({"INFERGRID_STATE_DIR": str(tmp_path)}).with_ports({"redis": 16379})
    assert StackConfig.from_env(config.to_env()) == config


@pytest.mark.parametrize("value", ["http", "0", "70000"])
def test_malformed_port_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="INFERGRID_REDIS_PORT"):
        StackConfig.from_env({"INFERGRID_REDIS_PORT": value})


def test_unknown_port_name_says_which_variable_to_set() -> None:
    with pytest.raises(ConfigError, match="INFERGRID_NOPE_PORT"):
        StackConfig.from_env({}).port("nope")


def test_the_cluster_profile_keeps_its_own_state_and_platform_file() -> None:
    single = StackConfig.from_env({})
    clustered = StackConfig.from_env({"INFERGRID_STACK_PROFILE": "cluster"})
    assert single.profile == "single" and clustered.is_cluster
    assert clustered.state_dir == single.state_dir / "cluster"
    assert clustered.platform_file == clustered.state_dir / "platform.yaml"
    assert single.platform_file == REPO_ROOT / "deploy" / "local" / "platform.yaml"
    assert StackConfig.from_env({}, profile="cluster") == clustered


def test_an_unknown_profile_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="INFERGRID_STACK_PROFILE"):
        StackConfig.from_env({"INFERGRID_STACK_PROFILE": "mesh"})
