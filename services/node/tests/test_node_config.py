"""What the node changes in the three services' configs (services/node/node.py `colocate`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.config import ConfigError
from services.node.node import load


def _env(repo: Path, **extra: str) -> dict[str, str]:
    return {
        "INFERGRID_FEATURES_TRANSPORT": "threaded",
        "INFERGRID_INFERENCE_TRANSPORT": "threaded",
        "INFERGRID_INFERENCE_MODEL_REPOSITORY": str(repo),
        "INFERGRID_GATEWAY_FEATURES_TARGET": "10.0.0.7:50052",
        "INFERGRID_GATEWAY_INFERENCE_TARGET": "10.0.0.8:8001",
        "INFERGRID_GATEWAY_PORT": "50999",
        **extra,
    }


def test_the_gateway_calls_both_in_process_and_they_serve_on_the_loop(tmp_path: Path) -> None:
    config = load(_env(tmp_path, INFERGRID_GATEWAY_WORKERS="2", INFERGRID_GATEWAY_TRANSPORT="threaded"))
    upstream = config.gateway.upstream
    assert (upstream.features_target, upstream.inference_target) == ("inproc:features", "inproc:inference")
    assert not upstream.inference_streaming
    assert config.features.server.transport == config.inference.server.transport == "aio"
    assert config.features.server.workers == config.inference.server.workers == 2
    # Everything else is each service's own: the gateway keeps its port and transport.
    assert config.gateway.server.port == 50999 and config.gateway.server.transport == "threaded"
    assert config.inference.models.model_repository == tmp_path


def test_a_worker_gets_its_own_spool_folder(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    config = load(_env(tmp_path, INFERGRID_GATEWAY_INFERENCE_LOG_SPOOL_DIR=str(spool)), worker="1")
    assert config.gateway.inference_log.inference_log_spool_dir == spool / "worker-1"


def test_a_bad_value_names_its_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="INFERGRID_INFERENCE_MODEL_REPOSITORY"):
        load(_env(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="INFERGRID_FEATURES_TRANSPORT"):
        load(_env(tmp_path, INFERGRID_FEATURES_TRANSPORT="carrier-pigeon"))
