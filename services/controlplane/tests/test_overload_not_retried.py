"""Envoy never retries an overload answer (RESOURCE_EXHAUSTED / 429) of the gateway, in any shipped platform file."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.platform import OVERLOAD_RETRY_CONDITIONS, load_platform
from services.controlplane.resources import public_routes

REPO = Path(__file__).resolve().parents[3]
PLATFORM_FILES = [
    REPO / "deploy" / "local" / "platform.yaml",
    *sorted((REPO / "deploy").glob("k8s/**/platform.yaml")),
]


@pytest.mark.parametrize("path", PLATFORM_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_the_gateway_routes_retry_on_has_no_overload_condition(path: Path) -> None:
    routes = public_routes(load_platform(path))
    for route in routes["virtual_hosts"][0]["routes"]:
        policy = route["route"]["retry_policy"]
        conditions = {c.strip() for c in policy["retry_on"].split(",")}
        assert not conditions & OVERLOAD_RETRY_CONDITIONS, (route["name"], policy["retry_on"])
        assert "retriable_status_codes" not in policy
        assert "unavailable" in conditions  # a dead replica is still retried on another host
