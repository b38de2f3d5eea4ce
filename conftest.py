"""Repository-wide pytest setup: the stack's real-server fixtures are available to every test."""

pytest_plugins = ["tests.stack_fixtures", "tests.cluster_fixtures"]
