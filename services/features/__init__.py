"""InferGrid features service: the online feature store (FeatureService)."""
