"""InferGrid gateway service: the public PredictionService (behind Envoy)."""
