"""The transport limit: a gRPC server answering KServe v2 ModelInfer with a fixed, valid response, computing nothing.

    python -m bench.servers.echo --mode aio|sync --port PORT

`aio`: one grpc.aio server on the default asyncio loop; `sync`: grpc.server with a ThreadPoolExecutor(10).
Both use a generic handler without (de)serializers, so the request bytes are never parsed and the
response is pre-serialized: what is left is gRPC's own per-call cost. The response is what the inference
service answers for one row of the demo `fraud` model (output `fraud_probability`, FP32 [1, 1]).
"""

from __future__ import annotations

import argparse
import asyncio
from concurrent import futures

import grpc

from inference import grpc_service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"


def response_bytes() -> bytes:
    reply = pb.ModelInferResponse(model_name="fraud", model_version="1")
    out = reply.outputs.add(name="fraud_probability", datatype="FP32", shape=[1, 1])
    del out
    reply.raw_output_contents.append(b"\x00\x00\x00\x3f")  # 0.5
    return reply.SerializeToString()


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("aio", "sync"), required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.mode == "aio":
        asyncio.run(serve_aio(args.port))
    else:
        serve_sync(args.port)


if __name__ == "__main__":
    main()
