"""Runs pytest on the test files given as arguments: the `main` of every py_pytest target.

A pytest-style test file run directly as a script defines its tests and exits 0
without running any, so Bazel's py_test needs this runner as its main. It reads
the repository's pyproject.toml (asyncio_mode, markers) from the runfiles.
"""

from __future__ import annotations

import os
import sys

import pytest


def main() -> int:
    """Runs pytest in the runfiles root (the test's working directory) and returns its exit code."""
    args = [
        # The runfiles tree is read-only inside the sandbox; the cache is useless there anyway.
        "-p",
        "no:cacheprovider",
        *sys.argv[1:],
    ]
    # Bazel's JUnit XML location: lets the test summary list individual test cases.
    xml = os.environ.get("XML_OUTPUT_FILE")
    if xml:
        args.append(f"--junitxml={xml}")
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main())
