"""One process that serves features, inference and the gateway together (the single-node profile).

See `services/node/README.md`.
"""
