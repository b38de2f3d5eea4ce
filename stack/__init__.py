"""The local stack: installs, starts, supervises and stops the real servers InferGrid runs against."""
