"""Typed errors of the inference service; each knows its gRPC status (see libs.errors)."""

from __future__ import annotations

import grpc

from libs.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)


class ModelNotFound(NotFound):
    """No such model, or no such (ready) version of it; the message names it."""


class InvalidInput(InvalidArgument):
    """A request tensor is missing, unknown or malformed; the message names it, expected vs given."""


class QueueFull(ResourceExhausted):
    """The model's queue is at its bound; the request was shed."""


class RequestTimeout(DeadlineExceeded):
    """The request's timeout passed before it was executed."""


class ModelUnavailable(Unavailable):
    """The model version is being unloaded; a retry (on another version or replica) may help."""


class ModelLoadError(FailedPrecondition):
    """A model could not be loaded; the message says why (also shown by RepositoryIndex)."""


class ModelConfigError(ModelLoadError):
    """A model configuration is malformed or inconsistent with the model file."""


class InvalidConfig(ModelConfigError):
    """A configuration field this server does not support, or a value it cannot use: the caller's to fix."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class BackendUnavailable(ModelLoadError):
    """The backend a model asks for cannot run here (e.g. no GPU or no TensorRT)."""


class BackendError(Internal):
    """The backend failed while executing a batch (not the request's fault); the message says which model."""


class NotSupported(ServiceError):
    """A Triton extension this server does not implement (shared memory, trace/log settings)."""

    code = grpc.StatusCode.UNIMPLEMENTED
