"""`python -m services.console`: the operator console on INFERGRID_CONSOLE_HOST:PORT."""

from __future__ import annotations

import logging
import os

from aiohttp import web

from libs.config import load_config_or_exit
from services.console.config import ENV_PREFIX, ConsoleConfig
from services.console.server import create_app

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    config = load_config_or_exit(ConsoleConfig, os.environ, ENV_PREFIX)
    logging.getLogger(__name__).info("console config: %s", config)
    web.run_app(create_app(config), host=config.host, port=config.port, print=None)
