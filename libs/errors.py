"""Typed errors that carry their gRPC status code, and `to_status`: the status any exception ends a call with."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc


class ServiceError(Exception):
    """A failure with a known gRPC status. The message is sent to the caller: no secrets in it."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, trailing_metadata: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        # Sent with the status (e.g. `retry-after`); Envoy's transcoder turns it into HTTP headers.
        self.trailing_metadata = trailing_metadata


class InvalidArgument(ServiceError):
    """The request is malformed; the message names the field and what is wrong with it."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    """A named thing (model, view, record) does not exist; the message names it."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    """The request is valid but conflicts with the current state (e.g. a type change)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ServiceError):
    """Load was shed or a rate limit was hit; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


# How long an overloaded server asks callers to wait before retrying (a queue drains in about this).
OVERLOAD_RETRY_S = 0.1


def retry_hint(delay_s: float) -> tuple[tuple[str, str], ...]:
    """Trailing metadata asking the caller to retry after `delay_s` seconds.

    `grpc-retry-pushback-ms` is what gRPC clients' retry policies honour; `retry-after` (whole seconds, at
    least 1: HTTP's header) is what Envoy's JSON transcoder passes on with the HTTP 429.
    """
    return (
        ("retry-after", str(max(1, math.ceil(delay_s)))),
        ("grpc-retry-pushback-ms", str(max(1, round(delay_s * 1000)))),
    )


def overloaded(message: str, retry_after_s: float = OVERLOAD_RETRY_S) -> ResourceExhausted:
    """RESOURCE_EXHAUSTED for shed load: the message and the trailing metadata say when to retry."""
    return ResourceExhausted(
        f"{message}; retry in {retry_after_s * 1000:.0f} ms", trailing_metadata=retry_hint(retry_after_s)
    )


class Unavailable(ServiceError):
    """A dependency is down or the circuit is open; a retry may help."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL


# Status codes that say nothing about the health of the dependency that returned them:
# they must not trip a circuit breaker and must not be retried.
CLIENT_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.CANCELLED,
    }
)


def status_code_of(exc: BaseException) -> grpc.StatusCode | None:
    """Returns the gRPC status an exception stands for: ours, a grpc.RpcError's, or None."""
    if isinstance(exc, ServiceError):
        return exc.code
    if isinstance(exc, grpc.RpcError):
        code = exc.code()
        return code if isinstance(code, grpc.StatusCode) else None
    return None


def is_client_error(exc: BaseException) -> bool:
    """True when the exception blames the request, not the dependency that answered it."""
    return status_code_of(exc) in CLIENT_ERROR_CODES


# "Busy, come back later": the dependency is alive and answered at once. An overload answer must not
# trip a circuit breaker (that turns a brief overload into seconds of 100 % errors) and must not be
# retried at once (a retry adds load where there is too much).
OVERLOAD_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})


def is_overload(exc: BaseException) -> bool:
    """True when the exception says the dependency is overloaded (shed load), not failing."""
    return status_code_of(exc) in OVERLOAD_CODES


# Outbound failures whose status is worth passing on as is; any other dependency failure becomes INTERNAL.
_PASS_THROUGH = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)


@dataclass(frozen=True, slots=True)
class Status:
    """What a failed call (or one failed message of a stream) tells its caller."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: tuple[tuple[str, str], ...] = ()
    # A bug rather than a typed failure: the caller sees only "internal error", the server logs the trace.
    unexpected: bool = False


_INTERNAL = Status(grpc.StatusCode.INTERNAL, "internal error", unexpected=True)


def to_status(exc: BaseException) -> Status:
    """The status `exc` stands for: ours as raised, a timeout or a passed-on dependency status, else INTERNAL.

    Used by the server interceptor (the call's status) and by streams that report errors in band.
    """
    if isinstance(exc, ServiceError):
        return Status(exc.code, exc.message, exc.trailing_metadata)
    if isinstance(exc, TimeoutError):
        return Status(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded waiting for a dependency")
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _PASS_THROUGH:
        return Status(exc.code(), f"dependency call failed: {exc.details()}")
    return _INTERNAL
