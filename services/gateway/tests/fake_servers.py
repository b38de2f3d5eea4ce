"""Small fake FeatureService and inference servers (real gRPC servicers) that gateway tests put behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np

from inference import grpc_service_pb2 as ipb
from inference import grpc_service_pb2_grpc
from infergrid.features.v1 import features_pb2, features_pb2_grpc
from infergrid.types.v1 import value_pb2
from services.gateway.tests.fakes import WEIGHTS, ServedFacts

STORE = {
    ("user", "u1"): {"age": 40.0, "count": 3.0},
    ("user", "42"): {"age": 42.0, "count": 4.0},
    ("merchant", "m1"): {"risk": 0.25},
}


async def serve(
    servicer: features_pb2_grpc.FeatureServiceServicer | grpc_service_pb2_grpc.GRPCInferenceServiceServicer,
) -> tuple[grpc.aio.Server, str]:
    """A started gRPC server with `servicer` on a free loopback port, and its address."""
    server = grpc.aio.server()
    if isinstance(servicer, features_pb2_grpc.FeatureServiceServicer):
        features_pb2_grpc.add_FeatureServiceServicer_to_server(servicer, server)
    else:
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


class FakeFeatureService(features_pb2_grpc.FeatureServiceServicer):
    def __init__(self) -> None:
        self.calls = 0
        self.down = False
        self.user_key_type = value_pb2.VALUE_TYPE_STRING
        self.time_remaining: list[float | None] = []
        # Each call's `traceparent` metadata ("" when it had none).
        self.traceparents: list[str] = []

    async def GetOnlineFeatures(  # noqa: N802
        self, request: features_pb2.GetOnlineFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.GetOnlineFeaturesResponse:
        self.calls += 1
        self.time_remaining.append(context.time_remaining())
        self.traceparents.append(dict(context.invocation_metadata() or ()).get("traceparent", ""))
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "store down")
        reply = features_pb2.GetOnlineFeaturesResponse(feature_names=request.features)
        keys = {"user": "user_id", "merchant": "merchant_id"}
        n = len(next(iter(request.entities.values())).values)
        for ref in request.features:
            view, feature = ref.split(":")
            vector = reply.results.add()
            for i in range(n):
                entity = request.entities[keys[view]].values[i].string_value  # keys arrive as strings
                if view == "user" and self.user_key_type == value_pb2.VALUE_TYPE_INT64:
                    if not entity.isdigit():  # converted to the view's key type, as the real service does
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"entities.user_id: expected an integer, got {entity!r} (row {i})",
                        )
                    entity = str(int(entity))
                value = STORE.get((view, entity), {}).get(feature)
                vector.values.add(float_value=value or 0.0)
                vector.statuses.append(
                    features_pb2.FEATURE_STATUS_PRESENT
                    if value is not None
                    else features_pb2.FEATURE_STATUS_NOT_FOUND
                )
        return reply


class FakeInference(ServedFacts, grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Scores rows as x @ WEIGHTS + version, over ModelInfer and ModelStreamInfer alike."""

    def __init__(self) -> None:
        self.calls = 0
        self.time_remaining: list[float | None] = []
        self.fail_with: str = ""

    def _score(self, request: ipb.ModelInferRequest) -> ipb.ModelInferResponse:
        self.calls += 1
        shape = list(request.inputs[0].shape)
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(shape)
        scores = (x @ WEIGHTS + float(request.model_version)).astype(np.float32).reshape(-1, 1)
        return ipb.ModelInferResponse(
            model_name=request.model_name,
            model_version=request.model_version,
            id=request.id,
            outputs=[
                ipb.ModelInferResponse.InferOutputTensor(name="score", datatype="FP32", shape=[shape[0], 1])
            ],
            raw_output_contents=[scores.tobytes()],
        )

    async def ModelInfer(  # noqa: N802
        self, request: ipb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> ipb.ModelInferResponse:
        self.time_remaining.append(context.time_remaining())
        if self.fail_with:
            await context.abort(grpc.StatusCode.NOT_FOUND, self.fail_with)
        return self._score(request)

    async def ModelStreamInfer(  # noqa: N802
        self, requests: AsyncIterator[ipb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ipb.ModelStreamInferResponse]:
        async for request in requests:
            timeout = request.parameters["timeout"].int64_param if "timeout" in request.parameters else 0
            self.time_remaining.append(timeout / 1e6 if timeout else None)
            if self.fail_with:
                reply = ipb.ModelStreamInferResponse(
                    error_message=self.fail_with, infer_response=ipb.ModelInferResponse(id=request.id)
                )
                reply.infer_response.parameters["status_code"].int64_param = grpc.StatusCode.NOT_FOUND.value[
                    0
                ]
                yield reply
                continue
            yield ipb.ModelStreamInferResponse(infer_response=self._score(request))
