"""The errors a call can raise: one class per gRPC status family.

Each carries ``message`` (the server's, safe to show), ``reason`` (a stable machine-readable code, the
``google.rpc.ErrorInfo`` reason the server sent, e.g. ``MODEL_NOT_FOUND``), ``violations`` (the bad fields
of an INVALID_ARGUMENT), ``retry_after_s`` (a server's RetryInfo) and ``request_id`` (the id the call sent as
``x-request-id``, under which the server logged it). They are the classes the servers raise, so client
and server code catch the same names.
"""

from __future__ import annotations

from shared.errors import (
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    MaasError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "MaasError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
]
