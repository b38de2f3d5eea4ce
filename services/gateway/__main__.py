"""Runs the gateway service: `python -m services.gateway` (configured by INFERGRID_GATEWAY_*)."""

from __future__ import annotations

import dataclasses
import logging
import os

from libs.config import load_config_or_exit, redacted
from libs.server import WORKER_ENV, Server, serve
from libs.telemetry import Telemetry
from services.gateway.config import ENV_PREFIX, GatewayConfig
from services.gateway.server import create_server


def main() -> None:
    config = load_config_or_exit(GatewayConfig, os.environ, ENV_PREFIX)
    worker = os.environ.get(WORKER_ENV)
    if worker is not None:
        # The spool folder is locked by its producer: each SO_REUSEPORT worker gets its own.
        log_config = config.inference_log
        spool = log_config.inference_log_spool_dir / f"worker-{worker}"
        config = dataclasses.replace(
            config, inference_log=dataclasses.replace(log_config, inference_log_spool_dir=spool)
        )

    async def factory(telemetry: Telemetry) -> Server:
        logging.getLogger(__name__).info("config", extra={"config": redacted(config)})
        return await create_server(config, telemetry)

    serve("gateway", config.server, config.telemetry, factory, os.environ)


if __name__ == "__main__":
    main()
