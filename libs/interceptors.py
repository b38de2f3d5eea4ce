"""The server interceptor every service runs: typed errors to gRPC status, and per-method metrics.

One wrapper per call does both jobs, so the per-call cost is paid once. A request body that does not
parse as its message is the caller's error (INVALID_ARGUMENT naming the field, see libs/wire.py), never
grpc's own "Unexpected <class ...DecodeError>" UNKNOWN: the deserializer is wrapped so that it never raises.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram

from libs.errors import InvalidArgument, to_status
from libs.metrics import LabelCache
from libs.wire import wire_problem

log = logging.getLogger(__name__)

# Names follow go-grpc-prometheus, which dashboards and the Prometheus adapter already know.
GRPC_STARTED = Counter(
    "grpc_server_started_total", "RPCs started on the server.", ["grpc_service", "grpc_method"]
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_LATENCY = Histogram(
    "grpc_server_handling_seconds",
    "Time from receiving an RPC to its status.",
    ["grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
GRPC_IN_FLIGHT = Gauge(
    "grpc_server_in_flight", "RPCs being handled now.", ["grpc_service"], multiprocess_mode="livesum"
)


class _Undecodable:
    """What the wrapped deserializer returns for bytes that do not parse: the problem, for the caller."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Wraps a request deserializer so that a body it cannot parse becomes an `_Undecodable`."""
    if deserializer is None:
        return None
    # Generated code passes `Message.FromString`, bound to the message class.
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            if descriptor is None:
                return _Undecodable("the request body is not a valid message")
            try:
                problem = wire_problem(descriptor, data)
            except Exception:  # never let the diagnosis fail the call
                problem = ""
            log.info("undecodable %s (%d bytes): %s", descriptor.full_name, len(data), problem or exc)
            return _Undecodable(
                f"the request body is not a valid {descriptor.full_name}: {problem or 'it does not parse'}"
            )

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream that raises InvalidArgument at the first message that did not parse."""
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise InvalidArgument(request.message)
        yield request


class _MethodMetrics:
    """Pre-bound metric children for one method (label lookups are the expensive part)."""

    __slots__ = ("_handled", "in_flight", "latency", "method", "service", "started")

    def __init__(self, full_method: str) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        self.service, self.method = service, method
        self.started = GRPC_STARTED.labels(service, method)
        self.latency = GRPC_LATENCY.labels(service, method)
        self.in_flight = GRPC_IN_FLIGHT.labels(service)
        self._handled = LabelCache(GRPC_HANDLED, service, method)

    def handled(self, code: grpc.StatusCode) -> Any:
        return self._handled(code.name)


def _final_code(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return default


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    """Aborts the call with the status `exc` stands for (`to_status`); always raises."""
    status = to_status(exc)
    if status.unexpected:
        log.error("unhandled error in %s", method, exc_info=exc)
    await context.abort(status.code, status.message, status.trailing_metadata)


def _decoded(request: Any) -> Any:
    """The request, or INVALID_ARGUMENT for one that did not parse; a request stream checks each message."""
    if isinstance(request, _Undecodable):
        raise InvalidArgument(request.message)
    if hasattr(request, "__aiter__"):  # stream_unary / stream_stream: the request iterator
        return _checked(request)
    return request


class _Call:
    """One call's metrics, and its exception turned into the call's status (`_abort_for`)."""

    __slots__ = ("_context", "_method", "_metrics", "_start")

    def __init__(self, metrics: _MethodMetrics, method: str, context: grpc.aio.ServicerContext) -> None:
        self._metrics, self._method, self._context = metrics, method, context
        self._start = 0.0

    async def __aenter__(self) -> None:
        self._metrics.started.inc()
        self._metrics.in_flight.inc()
        self._start = time.perf_counter()

    async def __aexit__(self, _: type[BaseException] | None, exc: BaseException | None, __: Any) -> bool:
        code = grpc.StatusCode.OK
        try:
            if isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit)):
                code = _final_code(self._context, grpc.StatusCode.CANCELLED)
            elif isinstance(exc, Exception):
                try:
                    await _abort_for(exc, self._context, self._method)
                finally:
                    code = _final_code(self._context, grpc.StatusCode.INTERNAL)
            return False
        finally:
            self._metrics.in_flight.dec()
            self._metrics.latency.observe(time.perf_counter() - self._start)
            self._metrics.handled(code).inc()


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to statuses (unknown ones to INTERNAL, logged once) and records metrics."""

    def __init__(self) -> None:
        self._metrics: dict[str, _MethodMetrics] = {}

    def _metrics_for(self, method: str) -> _MethodMetrics:
        m = self._metrics.get(method)
        if m is None:
            m = self._metrics[method] = _MethodMetrics(method)
        return m

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        metrics = self._metrics_for(method)
        kwargs = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, metrics), **kwargs
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method, metrics), **kwargs
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, metrics), **kwargs
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, method, metrics), **kwargs
        )

    @staticmethod
    def _wrap_unary(behavior: Callable[..., Any], method: str, metrics: _MethodMetrics) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _Call(metrics, method, context):
                return await behavior(_decoded(request), context)

        return wrapper

    @staticmethod
    def _wrap_stream(
        behavior: Callable[..., Any], method: str, metrics: _MethodMetrics
    ) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with _Call(metrics, method, context):
                result = behavior(_decoded(request), context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a coroutine that writes with context.write()
                    await result

        return wrapper
