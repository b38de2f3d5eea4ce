"""The in-process transport: gRPC calls between services that run in one process, without HTTP/2.

Every hop between our Python services costs a gRPC client and a gRPC server: about 0.7 ms of a core per
round trip on this machine, more than the work it carries (bench/results/latest/analysis.md). When
services share a process (`services.node` runs features, inference and the gateway together), a call
between them needs none of it.

`libs.server.build_server` keeps each server's method handlers as it wraps them (status mapping, metrics,
server spans). `publish(name, server)` makes them reachable as the discovery target `inproc:<name>`, and
`libs.channels.dial` answers such an address with a `LocalChannel`. The generated stubs work on it
unchanged, as does everything built on them (the channel pools, breakers and retries). A call runs the
same wrapped handler a network call would, on the caller's event loop. The request and the reply pass as
objects, without serialization; a handler that returns bytes (a pre-serialized reply) has them parsed by
the caller's deserializer.

Semantics kept:
- A failure reaches the caller as the `grpc.aio.AioRpcError` a network call would raise: the status the
  server's interceptor mapped, its details and trailing metadata.
- The deadline (`timeout=`) is the caller's: `time_remaining()` in the handler, DEADLINE_EXCEEDED when
  it passes.
- Metadata reaches `invocation_metadata()`.
- Trace context: the handler runs in the caller's context, so its server span is a child of the
  caller's current span.

Limits: unary-unary methods only (a streaming method fails UNIMPLEMENTED, naming the method); the server
must run on the grpc.aio transport, whose handlers are coroutines (a threaded server's handlers block,
and would block the caller's loop).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

PREFIX = "inproc:"

# Published servers: name -> {"/package.Service/Method": wrapped handler}.
_SERVERS: dict[str, Mapping[str, grpc.RpcMethodHandler]] = {}


def is_local(address: str) -> bool:
    """True for an `inproc:<name>` address."""
    return address.startswith(PREFIX)


def publish(name: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
    """Makes `handlers` (a built server's `handlers`) reachable in this process as `inproc:<name>`."""
    if not name:
        raise ValueError("an in-process server needs a name")
    _SERVERS[name] = dict(handlers)


def withdraw(name: str) -> None:
    """Removes a published server: calls to it fail UNAVAILABLE from then on."""
    _SERVERS.pop(name, None)


def _error(
    code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, str | bytes]] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)


class LocalContext:
    """The servicer context of an in-process call: what our handlers and interceptors use of grpc.aio's."""

    __slots__ = ("_code", "_deadline", "_details", "_metadata", "_trailing")

    def __init__(self, metadata: Sequence[tuple[str, str | bytes]], deadline: float | None) -> None:
        self._metadata = tuple(metadata)
        self._deadline = deadline
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def peer(self) -> str:
        return "inproc"

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailing

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        return None

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        """Ends the call with `code` (grpc.aio's: raises AbortError, which the caller's side turns into the
        AioRpcError a network call would raise)."""
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError(details)

    def failure(self) -> grpc.aio.AioRpcError:
        """The error the caller sees for the status this call ended with."""
        return _error(self._code or grpc.StatusCode.UNKNOWN, self._details, self._trailing)


class _UnaryUnary:
    """`channel.unary_unary(method)`: awaiting a call runs the published handler in this process."""

    __slots__ = ("_deserialize", "_method", "_server")

    def __init__(self, server: str, method: str, deserialize: Any) -> None:
        self._server, self._method, self._deserialize = server, method, deserialize

    async def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str | bytes]] | None = None,
        **_: Any,
    ) -> Any:
        handlers = _SERVERS.get(self._server)
        if handlers is None:
            raise _error(grpc.StatusCode.UNAVAILABLE, f"no server {PREFIX}{self._server} in this process")
        handler = handlers.get(self._method)
        if handler is None or handler.unary_unary is None:
            raise _error(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{self._method} is not a unary method of {PREFIX}{self._server} (in-process calls are unary)",
            )
        context = LocalContext(metadata or (), None if timeout is None else time.monotonic() + timeout)
        try:
            if timeout is None:
                reply = await handler.unary_unary(request, context)
            else:
                async with asyncio.timeout(timeout):
                    reply = await handler.unary_unary(request, context)
        except grpc.aio.AbortError:
            raise context.failure() from None
        except TimeoutError:
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        code = context.code()
        if code is not None and code != grpc.StatusCode.OK:
            raise context.failure()
        if isinstance(reply, bytes) and self._deserialize is not None:
            return self._deserialize(reply)
        return reply


class _Unsupported:
    """A streaming method on a LocalChannel: calling it fails UNIMPLEMENTED, naming the method."""

    def __init__(self, server: str, method: str) -> None:
        self._server, self._method = server, method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _error(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{self._method} on {PREFIX}{self._server}: in-process calls are unary only",
        )


class LocalChannel:
    """A channel to the server published as `inproc:<name>` (what `libs.channels.dial` returns for it)."""

    def __init__(self, address: str) -> None:
        if not is_local(address):
            raise ValueError(f"not an in-process address: {address!r} (expected {PREFIX}<name>)")
        self.server = address[len(PREFIX) :]

    def unary_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **_: Any
    ) -> _UnaryUnary:
        return _UnaryUnary(self.server, method, response_deserializer)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> _Unsupported:
        return _Unsupported(self.server, method)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> _Unsupported:
        return _Unsupported(self.server, method)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> _Unsupported:
        return _Unsupported(self.server, method)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return grpc.ChannelConnectivity.READY

    async def channel_ready(self) -> None:
        return None

    async def close(self, grace: float | None = None) -> None:
        return None

    async def __aenter__(self) -> LocalChannel:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None
