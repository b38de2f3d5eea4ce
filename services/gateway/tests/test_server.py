"""The gateway server on the shared bootstrap: SERVING, listed by reflection; a bad config value exits."""

from __future__ import annotations

from libs.testing import assert_bad_config_exits, assert_serves
from services.gateway.config import GatewayConfig, GatewayServerConfig
from services.gateway.server import SERVICE_NAME, create_server


async def test_serves_health_and_reflection() -> None:
    config = GatewayConfig(server=GatewayServerConfig(port=0), inference_log_enabled=False)
    await assert_serves(await create_server(config), SERVICE_NAME)


def test_malformed_port_exits_naming_the_variable() -> None:
    assert_bad_config_exits("services.gateway", "INFERGRID_GATEWAY_PORT", "not-a-port")
