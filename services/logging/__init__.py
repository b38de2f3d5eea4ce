"""InferGrid logging service: the inference-log consumer and query API (InferenceLogService)."""
