"""Fixtures: a model repository written once per session (demo fraud model plus small test models)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.inference.tests.models import write_repository


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository the tests only read (load/unload tests use `fresh_repo`)."""
    return write_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture
def fresh_repo(tmp_path: Path) -> Path:
    """A repository a test may change."""
    return write_repository(tmp_path / "models")
