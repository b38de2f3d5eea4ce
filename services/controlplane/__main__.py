"""Runs the xDS control plane: `python -m services.controlplane` (configured by INFERGRID_CONTROLPLANE_*)."""

from libs.server import main
from services.controlplane.config import ControlPlaneConfig
from services.controlplane.server import create_server

main("controlplane", ControlPlaneConfig, create_server)
