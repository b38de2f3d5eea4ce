"""InferGrid inference service: the Open Inference Protocol (KServe v2) model server."""
