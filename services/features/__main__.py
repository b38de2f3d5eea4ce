"""Runs the features service: `python -m services.features` (configured by INFERGRID_FEATURES_*)."""

from libs.server import main
from services.features.config import FeaturesConfig
from services.features.server import create_server

main("features", FeaturesConfig, create_server)
