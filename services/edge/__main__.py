"""Runs the edge policy service: `python -m services.edge` (configured by INFERGRID_EDGE_*)."""

from __future__ import annotations

import logging
import os

from libs.config import load_config_or_exit, redacted
from libs.server import Server, serve
from libs.telemetry import Telemetry
from services.edge.config import ENV_PREFIX, EdgeConfig
from services.edge.server import create_server


def main() -> None:
    config = load_config_or_exit(EdgeConfig, os.environ, ENV_PREFIX)

    async def factory(telemetry: Telemetry) -> Server:
        logging.getLogger(__name__).info("config", extra={"config": redacted(config)})
        return await create_server(config, telemetry)

    serve("edge", config.server, config.telemetry, factory, os.environ)


if __name__ == "__main__":
    main()
