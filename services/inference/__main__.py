"""Runs the inference service: `python -m services.inference` (configured by INFERGRID_INFERENCE_*)."""

from __future__ import annotations

import logging
import os
import sys

from libs.config import load_config_or_exit, redacted
from libs.server import Server, serve
from libs.telemetry import Telemetry
from services.inference.config import ENV_PREFIX, InferenceConfig
from services.inference.server import create_server


def main() -> None:
    config = load_config_or_exit(InferenceConfig, os.environ, ENV_PREFIX)
    repository = config.models.model_repository
    if repository is not None and not repository.is_dir():
        print(
            f"configuration error: {ENV_PREFIX}MODEL_REPOSITORY: {str(repository)!r} is not a directory",
            file=sys.stderr,
        )
        raise SystemExit(2)

    async def factory(telemetry: Telemetry) -> Server:
        logging.getLogger(__name__).info("config", extra={"config": redacted(config)})
        return await create_server(config, telemetry)

    serve("inference", config.server, config.telemetry, factory, os.environ)


if __name__ == "__main__":
    main()
