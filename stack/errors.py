"""Typed errors of the local stack; the CLI prints their message and exits non-zero."""


class StackError(Exception):
    """Base class: a stack operation failed for a reason the message explains."""


class ConfigError(StackError):
    """An environment variable holds a malformed value."""


class InstallError(StackError):
    """Installing a component (apt, Maven, Go, pip) failed."""


class PortInUseError(StackError):
    """A port a component needs is held by a process the stack did not start."""


class StartupError(StackError):
    """A component's process exited or did not become ready in time."""
