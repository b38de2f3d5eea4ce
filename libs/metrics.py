"""Prometheus helpers shared by the services: metric children bound once per label values."""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)


class LabelCache(Generic[M]):
    """A metric's children by label values, each bound on first use.

    `metric.labels(...)` per update is the costly part of a metric update on a hot path (it validates
    and hashes the values under a lock); a dict look-up of the bound child is not. `fixed` label values
    come first, the call's values after them: `LabelCache(HANDLED, service, method)(code)`.
    """

    __slots__ = ("_children", "_fixed", "_metric")

    def __init__(self, metric: M, *fixed: str) -> None:
        self._metric = metric
        self._fixed = fixed
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*self._fixed, *values)
        return child
