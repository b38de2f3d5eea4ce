"""Runs the gateway service: `python -m services.gateway` (configured by INFERGRID_GATEWAY_*)."""

from libs.server import main
from services.gateway.config import GatewayConfig, per_process
from services.gateway.server import create_server

main("gateway", GatewayConfig, create_server, prepare=per_process)
