"""Model backends: the interface the repository and batcher use, and the registry of implementations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from services.inference.config import ModelServingConfig
from services.inference.datatypes import DataType
from services.inference.model_config import ModelSpec

# (name, datatype, shape with -1 for dynamic dims) as the model file declares it.
Signature = list[tuple[str, DataType, list[int]]]


class LoadedModel(Protocol):
    """One loaded model version, ready to execute batches. `run` is called from executor threads."""

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Executes one batch; returns the outputs in `output_names` order."""
        ...

    def close(self) -> None:
        """Releases the model's resources; no `run` is in flight when called."""
        ...


class ModelBackend(Protocol):
    """Loads model files of one kind (ONNX Runtime, TensorRT)."""

    name: str

    def signature(self, model_path: Path) -> tuple[Signature, Signature]:
        """The inputs and outputs the model file declares (for config auto-complete and checks).

        Raises:
            ModelLoadError: The file cannot be read as a model.
        """
        ...

    def load(self, model_path: Path, spec: ModelSpec) -> LoadedModel:
        """Loads one version (blocking; call from an executor).

        Raises:
            BackendUnavailable: This backend cannot run on this machine; the message says why.
            ModelLoadError: The model file is unusable; the message says why.
        """
        ...


def create_backends(options: ModelServingConfig) -> dict[str, ModelBackend]:
    """Every backend by name, set up from the models section (threads, TensorRT cache and FP16); each imports its runtime lazily, so a missing one fails only its models."""
    from services.inference.backends.onnxruntime import OnnxRuntimeBackend
    from services.inference.backends.tensorrt import TensorRTBackend

    return {
        OnnxRuntimeBackend.name: OnnxRuntimeBackend(options),
        TensorRTBackend.name: TensorRTBackend(options),
    }
