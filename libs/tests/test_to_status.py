"""to_status: the one mapping from an exception to the status a call (or a stream message) ends with."""

from __future__ import annotations

import grpc
import pytest

from libs.errors import InvalidArgument, Status, overloaded, to_status


def test_typed_errors_keep_code_message_and_metadata() -> None:
    assert to_status(InvalidArgument("rows[0].x: not a number")) == Status(
        grpc.StatusCode.INVALID_ARGUMENT, "rows[0].x: not a number"
    )
    shed = overloaded("queue full", 2.0)
    status = to_status(shed)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status.trailing_metadata == shed.trailing_metadata
    assert ("retry-after", "2") in status.trailing_metadata
    assert not status.unexpected


def test_timeouts_and_passed_on_dependency_statuses() -> None:
    assert to_status(TimeoutError()).code == grpc.StatusCode.DEADLINE_EXCEEDED
    down = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
    assert to_status(down) == Status(grpc.StatusCode.UNAVAILABLE, "dependency call failed: gone")


@pytest.mark.parametrize(
    "exc",
    [
        KeyError("secret-looking detail"),
        grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "x"),
    ],
)
def test_anything_else_is_an_internal_error_that_says_nothing(exc: BaseException) -> None:
    status = to_status(exc)
    assert status.code == grpc.StatusCode.INTERNAL
    assert status.message == "internal error" and status.unexpected
