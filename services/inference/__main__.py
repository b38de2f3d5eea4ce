"""Runs the inference service: `python -m services.inference` (configured by INFERGRID_INFERENCE_*)."""

from libs.server import main
from services.inference.config import InferenceConfig, check_repository
from services.inference.server import create_server

main("inference", InferenceConfig, create_server, prepare=check_repository)
