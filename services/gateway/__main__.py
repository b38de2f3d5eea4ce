"""Runs the gateway service: `python -m services.gateway` (configured by INFERGRID_GATEWAY_*)."""

from __future__ import annotations

import logging
import os

from libs.config import load_config_or_exit, redacted
from libs.server import Server, serve
from libs.telemetry import Telemetry
from services.gateway.config import ENV_PREFIX, GatewayConfig
from services.gateway.server import create_server


def main() -> None:
    config = load_config_or_exit(GatewayConfig, os.environ, ENV_PREFIX)

    async def factory(telemetry: Telemetry) -> Server:
        logging.getLogger(__name__).info("config", extra={"config": redacted(config)})
        return await create_server(config, telemetry)

    serve("gateway", config.server, config.telemetry, factory, os.environ)


if __name__ == "__main__":
    main()
