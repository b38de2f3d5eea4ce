"""Runs the logging service: `python -m services.logging` (configured by INFERGRID_LOGGING_*)."""

from libs.server import main
from services.logging.config import LoggingConfig
from services.logging.server import create_server

main("logging", LoggingConfig, create_server)
