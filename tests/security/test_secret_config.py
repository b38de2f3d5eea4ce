"""Secrets in the configuration: `*_FILE` variables, their permissions, and what logging shows.

Unit tests of libs/config.py on real files; the services' start-up refusal is checked on a real process.
"""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from libs.checkout import checkout_env
from libs.config import ConfigError, hide_url_password, load_config, redacted, secret, url_with_credentials


@dataclass(frozen=True)
class _Config:
    url: str = "redis://127.0.0.1:6379/0"
    password: str = secret("")


def _secret(tmp_path: Path, value: str, mode: int) -> Path:
    path = tmp_path / "password"
    path.write_text(value + "\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_a_private_secret_file_is_read(tmp_path: Path, mode: int) -> None:
    path = _secret(tmp_path, "pa55", mode)
    assert load_config(_Config, {"X_PASSWORD_FILE": str(path)}, "X_").password == "pa55"


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602])
def test_a_secret_file_others_may_read_or_write_is_refused_naming_the_variable(
    tmp_path: Path, mode: int
) -> None:
    path = _secret(tmp_path, "pa55", mode)
    with pytest.raises(ConfigError) as err:
        load_config(_Config, {"X_PASSWORD_FILE": str(path)}, "X_")
    assert err.value.variable == "X_PASSWORD_FILE"
    assert f"{mode:04o}" in str(err.value) and "pa55" not in str(err.value)


def test_a_missing_or_empty_secret_file_is_refused_naming_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="X_PASSWORD_FILE: cannot read secret file"):
        load_config(_Config, {"X_PASSWORD_FILE": str(tmp_path / "absent")}, "X_")
    with pytest.raises(ConfigError, match=r"X_PASSWORD_FILE: secret file .* is empty"):
        load_config(_Config, {"X_PASSWORD_FILE": str(_secret(tmp_path, "", 0o600))}, "X_")
    with pytest.raises(ConfigError, match=r"X_PASSWORD_FILE: secret file .* is not a regular file"):
        load_config(_Config, {"X_PASSWORD_FILE": str(tmp_path)}, "X_")


def test_url_with_credentials_quotes_them_and_redacted_hides_the_password() -> None:
    url = url_with_credentials("redis://10.0.0.1:6380/2", "gate way", "p@ss:/word")
    assert url == "redis://gate%20way:p%40ss%3A%2Fword@10.0.0.1:6380/2"
    assert url_with_credentials("redis://h:1/0", "", "") == "redis://h:1/0"
    assert url_with_credentials("redis://a:b@h:1/0", "u", "p") == "redis://a:b@h:1/0"
    assert url_with_credentials("redis://[::1]:1/0", "u", "p") == "redis://u:p@[::1]:1/0"
    assert (
        hide_url_password(f"connect to {url} now") == "connect to redis://gate%20way:***@10.0.0.1:6380/2 now"
    )
    assert hide_url_password("redis://h:6379/0") == "redis://h:6379/0"
    shown = redacted(_Config(url="redis://u:hunter2@h:1/0", password="hunter3"))
    assert "hunter2" not in repr(shown) and "hunter3" not in repr(shown)
    assert shown == {"url": "redis://u:***@h:1/0", "password": "***"}


def test_a_service_with_a_world_readable_password_file_exits_2_naming_the_variable(tmp_path: Path) -> None:
    path = _secret(tmp_path, "s3cr3t-value", 0o644)
    variable = "INFERGRID_EDGE_REDIS_PASSWORD_FILE"
    result = subprocess.run(
        [sys.executable, "-m", "services.edge"],
        env={**os.environ, **checkout_env(), variable: str(path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert variable in result.stderr and "0644" in result.stderr
    assert "s3cr3t-value" not in result.stderr + result.stdout
