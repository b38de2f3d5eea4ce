"""pytest configuration for tests/; the stack fixtures come from the root conftest.py (tests/stack_fixtures.py)."""
