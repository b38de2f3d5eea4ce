"""The transport limit: a gRPC server answering KServe v2 ModelInfer with a fixed, valid response, computing nothing.

    python -m bench.servers.echo --mode aio|sync|predict|predict-sync|predict-hop --port PORT

`aio`: one grpc.aio server on the default asyncio loop; `sync`: grpc.server with a ThreadPoolExecutor(10);
`predict`: grpc.aio answering infergrid.gateway.v1.PredictionService/Predict with a fixed PredictResponse and
serving grpc.health.v1 (Envoy health-checks its upstream): the stand-in for the gateway behind Envoy;
`predict-sync`: the same on grpc.server with a ThreadPoolExecutor(10); `predict-hop`: the same, each
answer taken from a coroutine on an asyncio loop thread.
Both use a generic handler without (de)serializers, so the request bytes are never parsed and the
response is pre-serialized: what is left is gRPC's own per-call cost. The response is what the inference
service answers for one row of the demo `fraud` model (output `fraud_probability`, FP32 [1, 1]).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from concurrent import futures

import grpc

from inference import grpc_service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"
PREDICT_SERVICE = "infergrid.gateway.v1.PredictionService"


def response_bytes() -> bytes:
    reply = pb.ModelInferResponse(model_name="fraud", model_version="1")
    out = reply.outputs.add(name="fraud_probability", datatype="FP32", shape=[1, 1])
    del out
    reply.raw_output_contents.append(b"\x00\x00\x00\x3f")  # 0.5
    return reply.SerializeToString()


def predict_response_bytes() -> bytes:
    from infergrid.gateway.v1 import gateway_pb2

    reply = gateway_pb2.PredictResponse(request_id="0" * 32, model="fraud", model_version="1")
    reply.outputs["fraud_probability"].float_value = 0.5
    return reply.SerializeToString()


async def serve_predict(port: int) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1.health import aio as health_aio

    answer = predict_response_bytes()

    async def predict(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    server = grpc.aio.server()
    method = grpc.unary_unary_rpc_method_handler(predict)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(PREDICT_SERVICE, {"Predict": method}),)
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", PREDICT_SERVICE):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _handler(answer: bytes, is_async: bool) -> grpc.GenericRpcHandler:
    if is_async:

        async def infer_async(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return answer

        method = grpc.unary_unary_rpc_method_handler(infer_async)
    else:

        def infer(request: bytes, context: grpc.ServicerContext) -> bytes:
            return answer

        method = grpc.unary_unary_rpc_method_handler(infer)
    return grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": method})


async def serve_aio(port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(response_bytes(), True),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def serve_sync(port: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=10))
    server.add_generic_rpc_handlers((_handler(response_bytes(), False),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def serve_predict_sync(port: int, hop: bool = False) -> None:
    """`predict` on a threaded grpc.server (what a threaded gateway transport would cost behind Envoy).

    With `hop`, each call's answer comes from a coroutine on an asyncio loop in another thread (what a
    threaded transport in front of the gateway's asyncio pipeline would add: two cross-thread wake-ups).
    """
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    answer = predict_response_bytes()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=10))
    if hop:
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()

        async def on_loop() -> bytes:
            return answer

        method = grpc.unary_unary_rpc_method_handler(
            lambda request, context: asyncio.run_coroutine_threadsafe(on_loop(), loop).result()
        )
    else:
        method = grpc.unary_unary_rpc_method_handler(lambda request, context: answer)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(PREDICT_SERVICE, {"Predict": method}),)
    )
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", PREDICT_SERVICE):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode", choices=("aio", "sync", "predict", "predict-sync", "predict-hop"), required=True
    )
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.mode == "aio":
        asyncio.run(serve_aio(args.port))
    elif args.mode == "predict":
        asyncio.run(serve_predict(args.port))
    elif args.mode in ("predict-sync", "predict-hop"):
        serve_predict_sync(args.port, hop=args.mode == "predict-hop")
    else:
        serve_sync(args.port)


if __name__ == "__main__":
    main()
