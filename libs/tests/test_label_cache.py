"""LabelCache: one bound child per label values, the same object each time, fixed values first."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from libs.metrics import LabelCache


def test_children_are_bound_once_and_count_where_labels_would() -> None:
    registry = CollectorRegistry()
    calls = Counter("calls", "Calls.", ["service", "method", "code"], registry=registry)
    handled = LabelCache(calls, "svc", "Get")
    assert handled("OK") is handled("OK")
    assert handled("OK") is not handled("NOT_FOUND")
    handled("OK").inc()
    handled("OK").inc()
    handled("NOT_FOUND").inc()
    assert registry.get_sample_value("calls_total", {"service": "svc", "method": "Get", "code": "OK"}) == 2
    assert (
        registry.get_sample_value("calls_total", {"service": "svc", "method": "Get", "code": "NOT_FOUND"})
        == 1
    )
