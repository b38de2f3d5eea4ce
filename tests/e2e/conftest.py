"""Fixtures of the end-to-end tests: the whole stack behind a real Envoy (see whole_stack.py)."""

from tests.e2e.whole_stack import whole_stack

__all__ = ["whole_stack"]
