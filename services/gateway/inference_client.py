"""Where scores come from: the ModelClient role and its Open Inference Protocol (KServe v2) implementation."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Protocol

import grpc
import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import propagate

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from libs.errors import DeadlineExceeded, Internal, NotFound, Unavailable, overloaded
from libs.pool import ChannelPool, Endpoint
from libs.resilience import Dependency
from services.gateway.catalog import ModelSpec

_MODEL_INFER = "inference.GRPCInferenceService/ModelInfer"
_MODEL_STREAM_INFER = "inference.GRPCInferenceService/ModelStreamInfer"
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


def _outputs(reply: pb.ModelInferResponse, spec: ModelSpec, rows: int) -> dict[str, np.ndarray]:
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
            raise Internal(f"model {spec.name} output {tensor.name} has {array.size} values for {rows} rows")
        outputs[tensor.name] = array.reshape(rows, -1)
    return outputs


class GrpcModelClient:
    """GRPCInferenceService.ModelInfer (one unary call per batch) with raw tensor bytes, behind the breaker.

    Each batch goes to the next endpoint of the pool; one that fails UNAVAILABLE is retried on another.
    """

    def __init__(self, pool: ChannelPool, dependency: Dependency) -> None:
        self._pool = pool
        self._dependency = dependency

    async def _infer(self, request: pb.ModelInferRequest, deadline: float) -> pb.ModelInferResponse:
        async def _on(endpoint: Endpoint) -> pb.ModelInferResponse:
            stub = endpoint.stub(grpc_service_pb2_grpc.GRPCInferenceServiceStub)
            return await stub.ModelInfer(request, timeout=max(0.001, deadline - time.monotonic()))

        return await self._pool.call(_on, _MODEL_INFER)

    def _request(
        self, spec: ModelSpec, version: str, inputs: np.ndarray, timeout: float
    ) -> pb.ModelInferRequest:
        return pb.ModelInferRequest(
            model_name=spec.name,
            model_version=version,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name=spec.input_name, datatype="FP32", shape=inputs.shape
                )
            ],
            raw_input_contents=[inputs.tobytes()],
        )

    async def infer(
        self, spec: ModelSpec, version: str, inputs: np.ndarray, timeout: float
    ) -> dict[str, np.ndarray]:
        request = self._request(spec, version, inputs, timeout)
        deadline = time.monotonic() + timeout
        try:
            reply = await self._dependency.call(self._infer, request, deadline, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _domain_error(exc, spec.name, version) from None
        return _outputs(reply, spec, inputs.shape[0])

    async def close(self) -> None:
        """Closes the pool's channels and the streams on them (their pending batches fail UNAVAILABLE)."""
        await self._pool.close()


_STREAM = "model-stream"
# The parameter our inference server puts on a streamed refusal when it drains (shuts down).
_DRAINING = "draining"


class Draining(Unavailable):
    """The inference endpoint refused a streamed batch because it is draining (SIGTERM): it takes no new
    work on its open stream, finishes what it has, and goes away."""


def draining(endpoint: Endpoint) -> bool:
    """True while the endpoint's open inference stream has been refused for draining (until it ends)."""
    stream = endpoint.extras.get(_STREAM)
    return isinstance(stream, _Stream) and stream.broken is None and stream.draining


class StreamingModelClient(GrpcModelClient):
    """GRPCInferenceService.ModelStreamInfer: every batch travels as one message on a long-lived bidi stream.

    A unary call pays gRPC's per-call set-up on both sides (call object, metadata, status); a message
    on an open stream does not, and the inference server batches streamed requests the same way
    (figures: bench/results/code-figures.md). Requests carry an `id`; replies come back
    in completion order and are matched by it. A failed message comes back with `error_message` and
    our server's `status_code` parameter (a gRPC status number), mapped like a unary call's status. The
    trace context travels per message in the `traceparent` parameter, so each batch is still one span
    in the caller's trace.

    There is one stream per inference endpoint (the pool's channels): each batch goes over the stream
    of the pool's next healthy endpoint, so a gateway process spreads over every replica. When a stream
    breaks (the server restarted, the connection dropped), its pending batches fail UNAVAILABLE, the
    pool retries them on another endpoint and the next batch for that endpoint opens a new stream. A
    stream refused for draining (the server got SIGTERM and answers new messages with the parameter
    `draining`) fails every later batch at once with `Draining`, without sending it, until the server
    ends it: the pool retries them on another endpoint, and failover (`draining`) skips an inference
    pool whose endpoints all drain. A stream with an unanswered request past its deadline by
    `hang_margin_s` is hung (a server
    that accepts messages and never answers): `check_hung` (run by `watch`) fails its pending batches
    UNAVAILABLE the same way, ejects the endpoint and drops the stream, instead of waiting for keepalive.
    """

    def __init__(self, pool: ChannelPool, dependency: Dependency, hang_margin_s: float = 1.0) -> None:
        super().__init__(pool, dependency)
        self._hang_margin_s = hang_margin_s

    def _stream(self, endpoint: Endpoint) -> _Stream:
        stream = endpoint.extras.get(_STREAM)
        if not isinstance(stream, _Stream) or stream.broken is not None:
            stream = _Stream(endpoint.stub(grpc_service_pb2_grpc.GRPCInferenceServiceStub), endpoint.address)
            endpoint.extras[_STREAM] = stream
        return stream

    async def _infer(self, request: pb.ModelInferRequest, deadline: float) -> pb.ModelInferResponse:
        async def _on(endpoint: Endpoint) -> pb.ModelInferResponse:
            try:
                return await self._stream(endpoint).call(request, deadline)
            except Draining:
                # Refused by design, not failed: the pool ejects it, but for its first period only, so a
                # replica restarted at the same address gets traffic back soon after it serves again.
                endpoint.failures = 0
                raise

        return await self._pool.call(_on, _MODEL_STREAM_INFER)

    def _request(
        self, spec: ModelSpec, version: str, inputs: np.ndarray, timeout: float
    ) -> pb.ModelInferRequest:
        request = super()._request(spec, version, inputs, timeout)
        # The batch's deadline (microseconds), which a unary call carries as grpc-timeout: the server
        # drops the request rather than compute an answer nobody waits for.
        request.parameters["timeout"].int64_param = max(1, int(timeout * 1e6))
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        if "traceparent" in carrier:
            request.parameters["traceparent"].string_param = carrier["traceparent"]
        return request

    def check_hung(self) -> int:
        """Breaks every hung stream (see the class docstring); returns how many."""
        now = time.monotonic()
        hung = 0
        for endpoint in self._pool.endpoints:
            stream = endpoint.extras.get(_STREAM)
            if not isinstance(stream, _Stream) or stream.broken is not None:
                continue
            overdue = stream.overdue(now)
            if overdue > self._hang_margin_s:
                hung += 1
                error = Unavailable(
                    f"the inference stream to {endpoint.address} is hung: no answer {overdue:.2f}s past a deadline"
                )
                self._pool.eject(endpoint, error)
                stream.abandon(error)
        return hung

    async def watch(self, interval_s: float = 0.1) -> None:
        """Checks for hung streams every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            self.check_hung()


_CODES = {code.value[0]: code for code in grpc.StatusCode}


class _Stream:
    """One open ModelStreamInfer call: writes serialized by a lock, one reader resolving futures by id.

    `_sent` remembers the deadline of every request not answered yet, also of those whose caller gave
    up: a server that answers none of them is hung, whatever the callers did.
    """

    def __init__(self, stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub, address: str = "") -> None:
        self._pending: dict[str, asyncio.Future[pb.ModelInferResponse]] = {}
        self._sent: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._address = address
        self.broken: Exception | None = None
        # The server refused a message because it drains: no new message goes on this stream.
        self.draining = False
        # Outside any request's trace: the stream outlives the batch that happened to open it.
        token = otel_context.attach(otel_context.Context())
        try:
            self._call = stub.ModelStreamInfer()
            self._reader = asyncio.get_running_loop().create_task(self._read())
        finally:
            otel_context.detach(token)

    async def call(self, request: pb.ModelInferRequest, deadline: float) -> pb.ModelInferResponse:
        if self.broken is not None:
            raise self.broken
        if self.draining:
            raise Draining(f"the inference server {self._address} is draining")
        request_id = str(next(self._ids))
        request.id = request_id
        future: asyncio.Future[pb.ModelInferResponse] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._sent[request_id] = deadline
        try:
            try:
                async with self._write_lock:
                    await self._call.write(request)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
                self._break(Unavailable(f"the inference stream to {self._address} broke: {exc}"))
            return await future
        finally:
            self._pending.pop(request_id, None)

    def overdue(self, now: float) -> float:
        """Seconds the unanswered request with the earliest deadline is past it (<= 0: nothing overdue)."""
        # Few at a time (a batch per model in flight, by default): a scan every check is cheap.
        return now - min(self._sent.values()) if self._sent else 0.0

    async def _read(self) -> None:
        try:
            async for reply in self._call:
                self._sent.pop(reply.infer_response.id, None)
                refused = bool(reply.error_message) and _DRAINING in reply.infer_response.parameters
                self.draining = self.draining or refused
                future = self._pending.get(reply.infer_response.id)
                if future is None or future.done():
                    continue  # its caller gave up (deadline)
                if refused:
                    future.set_exception(Draining(f"the inference server {self._address} is draining"))
                elif reply.error_message:
                    status = reply.infer_response.parameters.get("status_code")
                    code = grpc.StatusCode.INTERNAL
                    if status is not None:
                        code = _CODES.get(status.int64_param, code)
                    # The status the server reported, as a unary call's would arrive.
                    empty = grpc.aio.Metadata()
                    future.set_exception(grpc.aio.AioRpcError(code, empty, empty, reply.error_message))
                else:
                    future.set_result(reply.infer_response)
            self._break(Unavailable(f"the inference stream to {self._address} was closed by the server"))
        except grpc.aio.AioRpcError as exc:
            self._break(
                Unavailable(
                    f"the inference stream to {self._address} broke: {exc.code().name} {exc.details()}"
                )
            )
        except asyncio.CancelledError:
            self._break(Unavailable(f"the inference stream to {self._address} was closed"))
            raise

    def _break(self, error: Exception) -> None:
        if self.broken is None:
            self.broken = error
        self._sent.clear()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self.broken)

    def abandon(self, error: Exception) -> None:
        """Fails the pending requests with `error` and cancels the call (a hung stream)."""
        self._break(error)
        self._call.cancel()
        self._reader.cancel()

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def _domain_error(exc: grpc.aio.AioRpcError, model: str, version: str) -> Exception:
    code = exc.code()
    what = f"model {model!r} version {version!r}" if version else f"model {model!r}"
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what} is not loaded in the inference service")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"the inference service did not answer in time for {what}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # its queue is full: overload, not an outage
        return overloaded(f"the inference service is overloaded for {what}: {exc.details()}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"the inference service is unavailable for {what}: {exc.details()}")
    return Internal(f"the inference service failed for {what}: {code.name}")
