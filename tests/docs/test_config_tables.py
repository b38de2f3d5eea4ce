"""Every service README's variable table is its config classes' (tools/config_tables.py writes it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tables_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("config_tables", ROOT / "tools" / "config_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = _tables_module()


@pytest.mark.parametrize("service", sorted(tables.SERVICES))
def test_readme_variable_table_equals_the_config_classes(service: str) -> None:
    readme = tables.readme(service).read_text()
    assert tables.rewritten(service) == readme, (
        f"services/{service}/README.md's variable table differs from its config classes; "
        "run python tools/config_tables.py"
    )


@pytest.mark.parametrize("service", sorted(tables.SERVICES))
def test_every_variable_of_the_config_is_in_the_table(service: str) -> None:
    module, name = tables.SERVICES[service]
    config_class = getattr(importlib.import_module(module), name)
    readme = tables.readme(service).read_text()
    for variable, default, _ in tables.rows(config_class, f"INFERGRID_{service.upper()}_"):
        assert f"| `{variable}` | `{default}` |" in readme
