"""Typed errors of the features service, each carrying its gRPC status (mapped by libs' interceptor)."""

from __future__ import annotations

from libs.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable


class ViewNotFound(NotFound):
    """No feature view has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"feature view {name!r} does not exist")
        self.view = name


class FeatureNotFound(NotFound):
    """The view exists but has no feature of this name."""

    def __init__(self, view: str, feature: str) -> None:
        super().__init__(f"feature view {view!r} has no feature {feature!r}")
        self.view = view
        self.feature = feature


class IncompatibleChange(FailedPrecondition):
    """Applying the view would change what existing values mean (a type or the entity key)."""


class StoreUnavailable(Unavailable):
    """Cassandra cannot be reached (down, timing out, or the circuit is open)."""


__all__ = [
    "FeatureNotFound",
    "IncompatibleChange",
    "InvalidArgument",
    "StoreUnavailable",
    "ViewNotFound",
]
