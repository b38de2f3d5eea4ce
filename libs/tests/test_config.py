"""Tests for typed configuration from the environment."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from libs.config import Bounded, ConfigError, env_var, load_config, redacted, secret, section, setting


@dataclass(frozen=True)
class _Inner:
    port: int = 10
    hosts: tuple[str, ...] = ("a",)


@dataclass(frozen=True)
class _Config:
    name: str
    ratio: float = 0.5
    enabled: bool = False
    data_dir: Path = Path("/tmp")
    token: str = secret("")
    endpoint: str = env_var("OTHER_ENDPOINT", "")
    inner: _Inner = field(default_factory=_Inner)


def test_reads_and_converts_every_type() -> None:
    env = {
        "X_NAME": "svc",
        "X_RATIO": "0.25",
        "X_ENABLED": "yes",
        "X_DATA_DIR": "/var/x",
        "X_PORT": "99",
        "X_HOSTS": "h1, h2,,h3",
        "OTHER_ENDPOINT": "http://e",
    }
    cfg = load_config(_Config, env, "X_")
    assert cfg == _Config(
        name="svc",
        ratio=0.25,
        enabled=True,
        data_dir=Path("/var/x"),
        endpoint="http://e",
        inner=_Inner(port=99, hosts=("h1", "h2", "h3")),
    )


def test_defaults_apply_when_unset() -> None:
    cfg = load_config(_Config, {"X_NAME": "n"}, "X_")
    assert cfg.ratio == 0.5 and cfg.inner.port == 10 and cfg.enabled is False


def test_missing_required_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"X_NAME: is required"):
        load_config(_Config, {}, "X_")


@pytest.mark.parametrize(
    ("var", "value", "problem"),
    [
        ("X_PORT", "eighty", "is not an integer"),
        ("X_RATIO", "half", "is not a number"),
        ("X_ENABLED", "maybe", "is not a boolean"),
    ],
)
def test_malformed_value_names_the_variable(var: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_Config, {"X_NAME": "n", var: value}, "X_")
    assert err.value.variable == var
    assert problem in str(err.value) and repr(value) in str(err.value)


def test_secret_from_file_and_redacted(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cr3t\n")
    token_file.chmod(0o600)
    cfg = load_config(_Config, {"X_NAME": "n", "X_TOKEN_FILE": str(token_file)}, "X_")
    assert cfg.token == "s3cr3t"
    shown = redacted(cfg)
    assert shown["token"] == "***"
    assert "s3cr3t" not in repr(shown)
    assert shown["inner"] == {"port": 10, "hosts": ("a",)}


def test_unreadable_secret_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="X_TOKEN_FILE: cannot read secret file"):
        load_config(_Config, {"X_NAME": "n", "X_TOKEN_FILE": str(tmp_path / "nope")}, "X_")


@dataclass(frozen=True)
class _Bounded(Bounded):
    workers: int = setting(1, minimum=1)
    port: int = setting(0, minimum=0, maximum=65535)
    timeout_s: float = setting(1.0, positive=True)
    mode: str = setting("a", choices=("a", "b"))


@pytest.mark.parametrize(
    ("var", "value", "problem"),
    [
        ("X_WORKERS", "0", "workers must be at least 1, got 0"),
        ("X_PORT", "70000", "port must be 0..65535, got 70000"),
        ("X_PORT", "-1", "port must be 0..65535, got -1"),
        ("X_TIMEOUT_S", "0", "timeout_s must be positive, got 0.0"),
        ("X_MODE", "c", "mode must be one of ('a', 'b'), got 'c'"),
    ],
)
def test_a_setting_out_of_its_bounds_names_the_variable_and_the_value(
    var: str, value: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_Bounded, {var: value}, "X_")
    assert err.value.variable == var
    assert str(err.value) == f"{var}: {problem}"


def test_bounds_hold_when_a_section_is_built_directly() -> None:
    assert _Bounded(workers=4, port=65535, timeout_s=0.5, mode="b").workers == 4
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        _Bounded(workers=0)


@dataclass(frozen=True)
class _Sections:
    inner: _Inner = section(_Inner, port=20)


def test_a_section_has_its_own_defaults_which_variables_override() -> None:
    assert _Sections().inner.port == 20
    assert load_config(_Sections, {}, "X_").inner == _Inner(port=20)
    assert load_config(_Sections, {"X_PORT": "30"}, "X_").inner.port == 30
