"""Where scores come from: the ModelClient role and its Open Inference Protocol (KServe v2) implementation."""

from __future__ import annotations

from typing import Protocol

import grpc
import numpy as np

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from libs.errors import DeadlineExceeded, Internal, NotFound, Unavailable
from libs.resilience import Dependency
from services.gateway.catalog import ModelSpec

_DTYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT16": np.int16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


class ModelClient(Protocol):
    """Runs a model version on a batch of input rows."""

    async def infer(
        self, spec: ModelSpec, version: str, inputs: np.ndarray, timeout: float
    ) -> dict[str, np.ndarray]:
        """The outputs for `inputs` (float32 [rows, spec.width]), each reshaped to [rows, -1].

        Raises:
            Unavailable, NotFound, DeadlineExceeded, Internal: the call failed.
        """
        ...


class GrpcModelClient:
    """GRPCInferenceService.ModelInfer with raw tensor bytes, behind the dependency's breaker."""

    def __init__(self, channel: grpc.aio.Channel, dependency: Dependency) -> None:
        self._stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self._dependency = dependency

    async def _infer(self, request: pb.ModelInferRequest, timeout: float) -> pb.ModelInferResponse:
        return await self._stub.ModelInfer(request, timeout=timeout)

    async def infer(
        self, spec: ModelSpec, version: str, inputs: np.ndarray, timeout: float
    ) -> dict[str, np.ndarray]:
        rows = inputs.shape[0]
        request = pb.ModelInferRequest(
            model_name=spec.name,
            model_version=version,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name=spec.input_name, datatype="FP32", shape=inputs.shape
                )
            ],
            raw_input_contents=[inputs.tobytes()],
        )
        try:
            reply = await self._dependency.call(self._infer, request, timeout, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _domain_error(exc, spec.name, version) from None
        outputs: dict[str, np.ndarray] = {}
        raws = reply.raw_output_contents
        for i, tensor in enumerate(reply.outputs):
            dtype = _DTYPES.get(tensor.datatype)
            if dtype is None:
                continue
            array: np.ndarray
            if i < len(raws):
                array = np.frombuffer(raws[i], dtype=dtype)
            else:
                array = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
            if array.size % rows:
                raise Internal(
                    f"model {spec.name} output {tensor.name} has {array.size} values for {rows} rows"
                )
            outputs[tensor.name] = array.reshape(rows, -1)
        return outputs


def _domain_error(exc: grpc.aio.AioRpcError, model: str, version: str) -> Exception:
    code = exc.code()
    what = f"model {model!r} version {version!r}" if version else f"model {model!r}"
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what} is not loaded in the inference service")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"the inference service did not answer in time for {what}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED):
        return Unavailable(f"the inference service is unavailable for {what}: {exc.details()}")
    return Internal(f"the inference service failed for {what}: {code.name}")
