"""Mapping between domain errors and gRPC statuses with ``google.rpc`` details, both ways."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from shared import errors

ERROR_DOMAIN = "maas.dev"
DETAILS_KEY = "grpc-status-details-bin"
# Parameters of a ModelStreamInferResponse whose error_message reports one request's failure (the stream
# goes on, so there is no call status): the status code's name and the ErrorInfo reason.
STREAM_ERROR_CODE = "maas_error_code"
STREAM_ERROR_REASON = "maas_error_reason"

_CODES: dict[type[errors.MaasError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}
_ERRORS = {code: cls for cls, code in _CODES.items()}


def status_code_for(error: errors.MaasError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(error: errors.MaasError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """(code, message, trailing metadata carrying a google.rpc.Status with details) for ``error``."""
    code = status_code_for(error)
    details = [_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata))]
    if error.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in error.violations
                    ]
                )
            )
        )
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=error.message, details=details)
    return code, error.message, ((DETAILS_KEY, status.SerializeToString()),)


def status_bytes(error: errors.MaasError) -> bytes:
    """``error`` as a serialized ``google.rpc.Status`` (for answers that carry one error per entry)."""
    return to_status(error)[2][0][1]


def _error(code: grpc.StatusCode, message: str, status: status_pb2.Status | None) -> errors.MaasError:
    cls = _ERRORS.get(code, errors.Internal if code != grpc.StatusCode.UNKNOWN else errors.Unavailable)
    reason, violations, retry_after_s = None, [], None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [errors.FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
    error = cls(message, reason=reason, violations=violations, retry_after_s=retry_after_s)
    error.grpc_code = code  # type: ignore[attr-defined]
    return error


_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def error_from_code(code_name: str, message: str, reason: str | None = None) -> errors.MaasError:
    """The domain error of a status code given by name (``NOT_FOUND``), as streams report one request's."""
    code = grpc.StatusCode.__members__.get(code_name, grpc.StatusCode.UNKNOWN)
    error = _error(code, message, None)
    if reason:
        error.reason = reason
    return error


def error_from_status(data: bytes) -> errors.MaasError:
    """The domain error a serialized ``google.rpc.Status`` (:func:`status_bytes`) stands for."""
    status = status_pb2.Status.FromString(data)
    code = _BY_VALUE.get(status.code, grpc.StatusCode.UNKNOWN)
    return _error(code, status.message or code.name, status)


def from_rpc_error(exc: grpc.RpcError) -> errors.MaasError:
    """The domain error a failed call stands for (its message is the server's, details decoded)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message = (exc.details() if hasattr(exc, "details") else "") or code.name
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    status = next((status_pb2.Status.FromString(v) for k, v in trailing or () if k == DETAILS_KEY), None)
    return _error(code, message, status)
