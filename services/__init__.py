"""InferGrid services: one package per deployable."""
