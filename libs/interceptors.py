"""The wrapper around every service's method handlers: typed errors to gRPC status, per-method metrics,
server spans.

One wrapper per call does all three jobs, so the per-call cost is paid once, and it is put around each
handler when the services register, so grpc.aio runs no interceptor per call. With a tracer (tracing on),
the call continues the caller's W3C trace context (`traceparent` metadata): a sampled or absent parent
gets a SERVER span named after the method (the root sampler decides for the absent one), a parent that
was not sampled gets none, only its context attached, so outgoing calls carry the decision on. This is
OpenTelemetry's gRPC server instrumentation without its per-call wrapping and attribute work for the
calls nobody samples (at 1 % sampling, nearly all). A request body that does not
parse as its message is the caller's error (INVALID_ARGUMENT naming the field, see libs/wire.py), never
grpc's own "Unexpected <class ...DecodeError>" UNKNOWN: the deserializer is wrapped so that it never raises.

The same wrapper serves both transports (`libs.server`): on grpc.aio it is a coroutine around the handler;
on the threaded grpc.server it runs on the server's thread, calls a plain `def` method there directly and
runs an `async def` method on the service's event loop (`asyncio.run_coroutine_threadsafe`), which a
cancelled call cancels.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
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
        yield _decoded(request)


def _checked_sync(requests: Iterator[Any]) -> Iterator[Any]:
    """`_checked` for the threaded transport's request iterator, read by a plain `def` method."""
    for request in requests:
        yield _decoded(request)


_END = object()


async def _pumped(requests: Iterator[Any]) -> AsyncIterator[Any]:
    """The threaded transport's request iterator for an `async def` method: a thread reads it for the loop."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue[Any]()

    def pump() -> None:
        try:
            for request in requests:
                loop.call_soon_threadsafe(queue.put_nowait, request)
        except Exception:  # a cancelled call ends its request stream
            pass
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _END)

    threading.Thread(target=pump, name="grpc-requests", daemon=True).start()
    while (request := await queue.get()) is not _END:
        yield _decoded(request)


def _on_loop(work: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop, context: Any) -> Any:
    """Runs `work` on `loop` and waits for it on this (server) thread; the call's end cancels it."""
    future = asyncio.run_coroutine_threadsafe(work, loop)
    context.add_callback(future.cancel)
    return future.result()


def _iterate(results: AsyncIterator[Any], loop: asyncio.AbstractEventLoop, context: Any) -> Iterator[Any]:
    """An `async def` method's response stream for the threaded transport: a task on `loop` runs it and
    hands each item to this thread (one wake-up per item); the call's end cancels the task."""
    items: queue.SimpleQueue[Any] = queue.SimpleQueue()

    async def drive() -> None:
        try:
            async for item in results:
                items.put(item)
        except BaseException as exc:  # the stream's error (or cancellation) ends it here too
            items.put(exc)  # never a response: those are messages
            raise
        finally:
            items.put(_END)

    future = asyncio.run_coroutine_threadsafe(drive(), loop)
    context.add_callback(future.cancel)
    try:
        while (item := items.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        future.cancel()


class _MethodMetrics:
    """Pre-bound metric children for one method (label lookups are the expensive part)."""

    __slots__ = ("handled", "in_flight", "latency", "method", "service", "started")

    def __init__(self, full_method: str) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        self.service, self.method = service, method
        self.started = GRPC_STARTED.labels(service, method)
        self.latency = GRPC_LATENCY.labels(service, method)
        self.in_flight = GRPC_IN_FLIGHT.labels(service)
        self.handled = LabelCache(GRPC_HANDLED, service, method)  # by the status code's name


def _final_code(context: Any, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else default


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    """Aborts the call with the status `exc` stands for (`to_status`); always raises."""
    status = to_status(exc)
    if status.unexpected:
        log.error("unhandled error in %s", method, exc_info=exc)
    await context.abort(status.code, status.message, status.trailing_metadata)


def _abort_sync(exc: BaseException, context: grpc.ServicerContext, method: str) -> None:
    """`_abort_for` on the threaded transport: its `abort` takes no metadata and raises a bare Exception."""
    status = to_status(exc)
    if status.unexpected:
        log.error("unhandled error in %s", method, exc_info=exc)
    if status.trailing_metadata:
        context.set_trailing_metadata(status.trailing_metadata)
    context.abort(status.code, status.message)


def _decoded(request: Any) -> Any:
    """The request, or INVALID_ARGUMENT for one that did not parse."""
    if isinstance(request, _Undecodable):
        raise InvalidArgument(request.message)
    return request


_TRACE_HEADERS = frozenset(("traceparent", "tracestate", "baggage"))


def _parent(context: Any) -> otel_context.Context | None:
    """The caller's trace context from the call's metadata (None: it sent no `traceparent`)."""
    carrier = {
        key: value if isinstance(value, str) else value.decode(errors="replace")
        for key, value in context.invocation_metadata() or ()
        if key in _TRACE_HEADERS
    }
    return propagate.extract(carrier) if "traceparent" in carrier else None


class _Call:
    """One call's metrics and span, and its exception turned into the call's status (`_abort_for`)."""

    __slots__ = ("_context", "_method", "_metrics", "_span", "_start", "_token", "_tracer")

    def __init__(
        self,
        metrics: _MethodMetrics,
        method: str,
        context: Any,
        tracer: trace.Tracer | None,
    ) -> None:
        self._metrics, self._method, self._context, self._tracer = metrics, method, context, tracer
        self._start = 0.0
        self._span: trace.Span | None = None
        self._token: object | None = None

    def __enter__(self) -> None:
        self._metrics.started.inc()
        self._metrics.in_flight.inc()
        self._start = time.perf_counter()
        if self._tracer is not None:
            self._trace()

    async def __aenter__(self) -> None:
        self.__enter__()

    def _trace(self) -> None:
        parent = _parent(self._context)
        if parent is not None and not trace.get_current_span(parent).get_span_context().trace_flags.sampled:
            self._token = otel_context.attach(parent)  # not sampled upstream: no span, the decision goes on
            return
        metrics = self._metrics
        span = self._tracer.start_span(  # type: ignore[union-attr]
            self._method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": metrics.service, "rpc.method": metrics.method},
        )
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span, parent))

    def _end_span(self, code: grpc.StatusCode, exc: BaseException | None) -> None:
        span = self._span
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {exc}" if exc else code.name))
            span.end()
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]

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
            self._finish(code, exc)

    def __exit__(self, _: type[BaseException] | None, exc: BaseException | None, __: Any) -> None:
        """The threaded transport's end of the call (a sync context: `abort` raised a bare Exception)."""
        code = grpc.StatusCode.OK
        try:
            if isinstance(
                exc, (concurrent.futures.CancelledError, asyncio.CancelledError, GeneratorExit)
            ) or (type(exc) is Exception and self._context.code() is not None):
                code = _final_code(self._context, grpc.StatusCode.CANCELLED)
            elif isinstance(exc, Exception):
                try:
                    _abort_sync(exc, self._context, self._method)
                finally:
                    code = _final_code(self._context, grpc.StatusCode.INTERNAL)
        finally:
            self._finish(code, exc)

    def _finish(self, code: grpc.StatusCode, exc: BaseException | None) -> None:
        self._metrics.in_flight.dec()
        self._metrics.latency.observe(time.perf_counter() - self._start)
        self._metrics.handled(code.name).inc()
        if self._token is not None:
            self._end_span(code, exc)


class ServerInterceptor:
    """Maps exceptions to statuses (unknown ones to INTERNAL, logged once), records metrics and spans.

    It wraps each method handler once, when the services register (`libs.server.build_server`), not per
    call: grpc.aio then runs no interceptor chain (a coroutine and a new handler per call) at all.

    Args:
        tracer: Server spans (see the module docstring); None: tracing is off.
        loop: The threaded transport's event loop, where `async def` methods run; None: grpc.aio.
    """

    def __init__(
        self, tracer: trace.Tracer | None = None, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._tracer, self._loop = tracer, loop

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler of `method` ("/package.Service/Method") with errors, metrics and spans."""
        metrics = _MethodMetrics(method)
        kwargs = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, metrics, False), **kwargs
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method, metrics, True), **kwargs
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, metrics, False), **kwargs
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, method, metrics, True), **kwargs
        )

    def generic(self, handler: grpc.GenericRpcHandler) -> grpc.GenericRpcHandler:
        """`handler` whose method handlers are wrapped (each once, on its first call)."""
        return _WrappedGeneric(handler, self.wrap)

    def _requests(self, behavior: Callable[..., Any], streamed: bool) -> Callable[[Any], Any]:
        """What turns grpc's request (or request iterator) into what `behavior` reads."""
        if not streamed:
            return _decoded
        if self._loop is None:
            return _checked
        is_async = inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
        return _pumped if is_async else _checked_sync

    def _wrap_unary(
        self, behavior: Callable[..., Any], method: str, metrics: _MethodMetrics, streamed: bool
    ) -> Callable[..., Any]:
        tracer, loop, requests = self._tracer, self._loop, self._requests(behavior, streamed)
        if loop is None:

            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with _Call(metrics, method, context, tracer):
                    result = behavior(requests(request), context)
                    return await result if inspect.isawaitable(result) else result  # a `def` method

            return wrapper

        def threaded(request: Any, context: grpc.ServicerContext) -> Any:
            with _Call(metrics, method, context, tracer):
                result = behavior(requests(request), context)
                return _on_loop(result, loop, context) if inspect.iscoroutine(result) else result

        return threaded

    def _wrap_stream(
        self, behavior: Callable[..., Any], method: str, metrics: _MethodMetrics, streamed: bool
    ) -> Callable[..., Any]:
        tracer, loop, requests = self._tracer, self._loop, self._requests(behavior, streamed)
        if loop is None:

            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with _Call(metrics, method, context, tracer):
                    result = behavior(requests(request), context)
                    if inspect.isasyncgen(result):
                        async for item in result:
                            yield item
                    elif inspect.isawaitable(result):  # a coroutine that writes with context.write()
                        await result
                    else:  # a `def` method's generator
                        for item in result:
                            yield item

            return wrapper

        def threaded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with _Call(metrics, method, context, tracer):
                result = behavior(requests(request), context)
                yield from _iterate(result, loop, context) if inspect.isasyncgen(result) else result

        return threaded


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are wrapped once each (by method, while the same)."""

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        wrap: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler],
    ) -> None:
        self._inner, self._wrap = inner, wrap
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        known = self._wrapped.get(method)
        if known is None or known[0] is not handler:
            known = self._wrapped[method] = (handler, self._wrap(handler, method))
        return known[1]
