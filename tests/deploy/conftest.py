"""Fixtures of the deploy tests: kustomize (built once, cached) and every overlay rendered once per session."""

from __future__ import annotations

import pytest

from deploy.k8s import kustomize
from tests.deploy.k8s_objects import OVERLAYS, Rendered, render


@pytest.fixture(scope="session")
def kustomize_binary() -> str:
    """The pinned kustomize, built from its Go module on first use (then cached)."""
    return str(kustomize.ensure_kustomize())


@pytest.fixture(scope="session")
def overlays(kustomize_binary: str) -> dict[str, Rendered]:
    """Every overlay, rendered."""
    return {name: Rendered(name, render(name)) for name in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, overlays: dict[str, Rendered]) -> Rendered:
    """Each overlay in turn."""
    return overlays[request.param]
