"""Runs the xDS control plane: `python -m services.controlplane` (configured by INFERGRID_CONTROLPLANE_*)."""

from __future__ import annotations

import logging
import os

from libs.config import load_config_or_exit, redacted
from libs.server import Server, serve
from libs.telemetry import Telemetry
from services.controlplane.config import ENV_PREFIX, ControlPlaneConfig
from services.controlplane.server import create_server


def main() -> None:
    config = load_config_or_exit(ControlPlaneConfig, os.environ, ENV_PREFIX)

    async def factory(telemetry: Telemetry) -> Server:
        logging.getLogger(__name__).info("config", extra={"config": redacted(config)})
        server, _ = await create_server(config, telemetry)
        return server

    serve("controlplane", config.server, config.telemetry, factory, os.environ)


if __name__ == "__main__":
    main()
