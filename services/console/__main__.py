"""`python -m services.console`: the operator console on INFERGRID_CONSOLE_HOST:PORT."""

from __future__ import annotations

import logging
import os
import sys

from aiohttp import web

from services.console.config import ConsoleConfig
from services.console.server import create_app

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    try:
        config = ConsoleConfig.from_env(os.environ)
    except ValueError as exc:
        print(f"console: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.getLogger(__name__).info("console config: %s", config)
    web.run_app(create_app(config), host=config.host, port=config.port, print=None)
