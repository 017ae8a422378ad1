"""Domain errors -> gRPC statuses, in one table.

Every error carries a human message and a google.rpc.ErrorInfo (reason,
domain, metadata); invalid input also carries google.rpc.BadRequest field
violations. Anything unexpected is logged in full and answered INTERNAL with
a generic message, so no exception text or traceback reaches a client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from storage import errors as e

log = logging.getLogger(__name__)

DOMAIN = "booking.v1"


@dataclass(eq=False)
class FieldViolation:
    field: str
    description: str


@dataclass(eq=False)
class InvalidArgument(e.BookingError):
    """The request itself is malformed; nothing was read or written."""

    reason = "INVALID_ARGUMENT"
    violations: list[FieldViolation] = field(default_factory=list)

    def __str__(self) -> str:
        return "; ".join(f"{v.field}: {v.description}" for v in self.violations)

    def metadata(self) -> dict[str, str]:
        return {"fields": ",".join(v.field for v in self.violations)}


@dataclass(eq=False)
class Unauthenticated(e.BookingError):
    reason = "UNAUTHENTICATED"
    detail: str = "missing or invalid bearer token"

    def __str__(self) -> str:
        return self.detail


@dataclass(eq=False)
class PermissionDenied(e.BookingError):
    reason = "PERMISSION_DENIED"
    method: str = ""
    detail: str = ""

    def __str__(self) -> str:
        return self.detail or f"the caller may not call {self.method}"


@dataclass(eq=False)
class TooManyStreams(e.BookingError):
    reason = "TOO_MANY_STREAMS"
    limit: int = 0

    def __str__(self) -> str:
        return f"the server already serves its limit of {self.limit} event streams"


# The one table. Subclasses inherit their base's code (NotFound covers all
# missing resources).
CODES: dict[type[e.BookingError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    e.InvalidValue: grpc.StatusCode.INVALID_ARGUMENT,
    e.RequestIdReused: grpc.StatusCode.INVALID_ARGUMENT,
    e.NotFound: grpc.StatusCode.NOT_FOUND,
    e.EmailTaken: grpc.StatusCode.ALREADY_EXISTS,
    e.SlotOverlap: grpc.StatusCode.ALREADY_EXISTS,
    e.SlotUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    e.SlotBusy: grpc.StatusCode.FAILED_PRECONDITION,
    e.WrongState: grpc.StatusCode.FAILED_PRECONDITION,
    e.HoldExpired: grpc.StatusCode.FAILED_PRECONDITION,
    e.UserOverlap: grpc.StatusCode.FAILED_PRECONDITION,
    e.UserInactive: grpc.StatusCode.FAILED_PRECONDITION,
    e.SpecialistInactive: grpc.StatusCode.FAILED_PRECONDITION,
    e.SlotNotStarted: grpc.StatusCode.FAILED_PRECONDITION,
    e.SpecialistMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    e.SameSlot: grpc.StatusCode.FAILED_PRECONDITION,
    e.InvalidCredentials: grpc.StatusCode.UNAUTHENTICATED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    e.LoginThrottled: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooManyStreams: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.TransactionConflict: grpc.StatusCode.ABORTED,
    e.DatabaseUnavailable: grpc.StatusCode.UNAVAILABLE,
    e.DatabaseTimeout: grpc.StatusCode.UNAVAILABLE,
}


def code_for(exc: e.BookingError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(exc: e.BookingError) -> grpc.Status:
    code = code_for(exc)
    details = [
        _pack(
            error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata())
        )
    ]
    violations: list[FieldViolation] = []
    if isinstance(exc, InvalidArgument):
        violations = exc.violations
    elif isinstance(exc, e.InvalidValue):
        violations = [FieldViolation(exc.field, exc.description)]
    elif isinstance(exc, e.RequestIdReused):
        violations = [FieldViolation("request_id", str(exc))]
    if violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in violations
                    ]
                )
            )
        )
    if isinstance(exc, e.LoginThrottled):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.seconds = exc.retry_after_seconds
        details.append(_pack(retry))
    status = status_pb2.Status(code=code.value[0], message=str(exc), details=details)
    return rpc_status.to_status(status)


def internal_status() -> grpc.Status:
    return rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.INTERNAL,
            message="internal error",
            details=[_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN))],
        )
    )


@dataclass(eq=False)
class ShuttingDown(e.BookingError):
    reason = "SHUTTING_DOWN"

    def __str__(self) -> str:
        return "the server is shutting down; reconnect and resume from your last cursor"


CODES[ShuttingDown] = grpc.StatusCode.UNAVAILABLE
