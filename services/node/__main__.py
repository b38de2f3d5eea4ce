"""Runs a node: `python -m services.node` (configured by INFERGRID_FEATURES_*, INFERGRID_INFERENCE_* and
INFERGRID_GATEWAY_*; see services/node/README.md)."""

from services.node.node import main

main()
