"""The inference server on the shared bootstrap: SERVING, listed by reflection; a bad config value exits."""

from __future__ import annotations

from libs.testing import assert_bad_config_exits, assert_serves
from services.inference.config import InferenceConfig, InferenceServerConfig
from services.inference.server import SERVICE_NAME, create_server


async def test_serves_health_and_reflection() -> None:
    server = await create_server(InferenceConfig(server=InferenceServerConfig(port=0)))
    await server.start()
    try:
        await assert_serves(f"127.0.0.1:{server.port}", SERVICE_NAME)
    finally:
        await server.stop(0, 0.5)


def test_malformed_port_exits_naming_the_variable() -> None:
    assert_bad_config_exits("services.inference", "INFERGRID_INFERENCE_PORT", "not-a-port")
