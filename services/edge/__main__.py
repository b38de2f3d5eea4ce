"""Runs the edge policy service: `python -m services.edge` (configured by INFERGRID_EDGE_*)."""

from libs.server import main
from services.edge.config import EdgeConfig
from services.edge.server import create_server

main("edge", EdgeConfig, create_server)
