"""The environment that runs InferGrid's modules from the checkout: the repository root and its generated code
(build/gen, `make gen`) on PYTHONPATH, written once for the stack, the benchmarks and the tests."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def python_path(root: Path = REPO_ROOT, *, inherit: bool = True) -> str:
    """The PYTHONPATH value: `root`, `root/build/gen`, then the current PYTHONPATH when `inherit`."""
    paths = [str(root), str(root / "build" / "gen")]
    if inherit and os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(dict.fromkeys(paths))


def checkout_env(extra: Mapping[str, str] | None = None, root: Path = REPO_ROOT) -> dict[str, str]:
    """This process's environment with `python_path(root)` as PYTHONPATH, then `extra` on top."""
    return {**os.environ, "PYTHONPATH": python_path(root), **(extra or {})}
