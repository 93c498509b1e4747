"""Domain errors, free of grpc.

Cores raise these; one server interceptor (``shared.grpc.status``) maps them to gRPC status codes with
``google.rpc`` details, and clients turn statuses back into them. Each carries a stable machine-readable
``reason`` (an ``ErrorInfo`` reason) besides its human message.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request (``google.rpc.BadRequest.FieldViolation``)."""

    field: str
    description: str


class MaasError(Exception):
    """Base of every error a client may see; the message is safe to show to clients."""

    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        violations: list[FieldViolation] | None = None,
        metadata: dict[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.violations = list(violations or [])
        self.metadata = dict(metadata or {})
        self.retry_after_s = retry_after_s
        # Set by clients: the id the failed call carried (``x-request-id``), which the server logged it under.
        self.request_id: str | None = None

    def __str__(self) -> str:
        return self.message


class InvalidArgument(MaasError):
    default_reason = "INVALID_ARGUMENT"

    @classmethod
    def field(cls, name: str, description: str, *, reason: str | None = None) -> InvalidArgument:
        """An error about one request field, its message naming the field."""
        return cls(f"{name}: {description}", reason=reason, violations=[FieldViolation(name, description)])


class NotFound(MaasError):
    default_reason = "NOT_FOUND"


class AlreadyExists(MaasError):
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(MaasError):
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(MaasError):
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(MaasError):
    default_reason = "UNAVAILABLE"


class DataLoss(MaasError):
    """Stored bytes failed their integrity check (a flipped bit, a truncated blob): never served."""

    default_reason = "DATA_LOSS"


class Unauthenticated(MaasError):
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(MaasError):
    default_reason = "PERMISSION_DENIED"


class DeadlineExceeded(MaasError):
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(MaasError):
    default_reason = "CANCELLED"


class Internal(MaasError):
    """Raised on the client side for a server's INTERNAL status; servers never raise it on purpose."""

    default_reason = "INTERNAL"
