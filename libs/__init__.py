"""Shared code for InferGrid services: bootstrap, config, telemetry, resilience, errors."""
