"""Domain errors -> gRPC statuses, in one table.

Every error carries a human message and a google.rpc.ErrorInfo (reason,
domain, metadata); invalid input also carries google.rpc.BadRequest field
violations. Anything unexpected is logged in full and answered INTERNAL with
a generic message, so no exception text or traceback reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
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

    def field_violations(self) -> list[tuple[str, str]]:
        return [(v.field, v.description) for v in self.violations]


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


@dataclass(eq=False)
class ShuttingDown(e.BookingError):
    reason = "SHUTTING_DOWN"

    def __str__(self) -> str:
        return "the server is shutting down; reconnect and resume from your last cursor"


# The one table from domain error to gRPC code (storage.errors.SQL_REASONS
# is the one from SQL failure reason to domain error). A subclass takes its
# base's code (NotFound covers every missing resource); a test requires
# exactly one entry on every error's MRO.
CODES: dict[type[e.BookingError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    e.InvalidValue: grpc.StatusCode.INVALID_ARGUMENT,
    e.RequestIdReused: grpc.StatusCode.INVALID_ARGUMENT,
    e.NotFound: grpc.StatusCode.NOT_FOUND,
    e.EmailTaken: grpc.StatusCode.ALREADY_EXISTS,
    e.SlotOverlap: grpc.StatusCode.ALREADY_EXISTS,
    e.SlotUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    e.SlotInUse: grpc.StatusCode.FAILED_PRECONDITION,
    e.NotEnoughSeats: grpc.StatusCode.FAILED_PRECONDITION,
    e.CapacityBelowSeatsTaken: grpc.StatusCode.FAILED_PRECONDITION,
    e.WithinBuffer: grpc.StatusCode.FAILED_PRECONDITION,
    e.SeriesTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.SeriesTooLong: grpc.StatusCode.INVALID_ARGUMENT,
    e.WrongState: grpc.StatusCode.FAILED_PRECONDITION,
    e.WaitlistEntryWrongState: grpc.StatusCode.FAILED_PRECONDITION,
    e.HoldExpired: grpc.StatusCode.FAILED_PRECONDITION,
    e.UserOverlap: grpc.StatusCode.FAILED_PRECONDITION,
    e.UserInactive: grpc.StatusCode.FAILED_PRECONDITION,
    e.SpecialistInactive: grpc.StatusCode.FAILED_PRECONDITION,
    e.SlotNotStarted: grpc.StatusCode.FAILED_PRECONDITION,
    e.SpecialistMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    e.SameSlot: grpc.StatusCode.FAILED_PRECONDITION,
    e.OutsideBookingWindow: grpc.StatusCode.FAILED_PRECONDITION,
    e.OutsideCancellationWindow: grpc.StatusCode.FAILED_PRECONDITION,
    e.ScheduleTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.InvalidCredentials: grpc.StatusCode.UNAUTHENTICATED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    e.LoginThrottled: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooManyStreams: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.CursorCompacted: grpc.StatusCode.OUT_OF_RANGE,
    e.CursorNotInHistory: grpc.StatusCode.OUT_OF_RANGE,
    e.TransactionConflict: grpc.StatusCode.ABORTED,
    e.DatabaseUnavailable: grpc.StatusCode.UNAVAILABLE,
    e.DatabaseTimeout: grpc.StatusCode.UNAVAILABLE,
    e.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
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


# Every status must fit a client's default limits for received metadata,
# trailers included: a hard limit of 16 KiB, and a soft limit of 8 KiB above
# which grpc refuses a growing share of calls at random (RESOURCE_EXHAUSTED).
# grpc-status-details-bin travels base64-encoded (4/3 of its size) and
# grpc-message percent-encoded (up to 3x), so the serialized
# google.rpc.Status is kept under 4 KiB and the message under 256 UTF-8
# bytes: about 6.3 KiB in the worst case, under the soft limit.
MAX_DETAILS_BYTES = 4 * 1024
MAX_MESSAGE_BYTES = 256
MAX_TEXT_CHARS = 256  # one field name, description or metadata value
MAX_METADATA_ENTRIES = 16


def _clip(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _clip_bytes(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode(errors="ignore") + "\u2026"


def to_status(exc: e.BookingError, extra_metadata: Mapping[str, str] | None = None) -> grpc.Status:
    """The status for `exc`, bounded to fit default client limits: the
    first violations that fit, with the total and the number left out in
    ErrorInfo metadata (``violations``, ``violations_omitted``).
    `extra_metadata` (the call's request and trace ids) joins ErrorInfo's."""
    code = code_for(exc)
    violations = [
        error_details_pb2.BadRequest.FieldViolation(
            field=_clip(field), description=_clip(description)
        )
        for field, description in exc.field_violations()
    ]
    metadata = {
        _clip(key, 63): _clip(value)
        for key, value in list(exc.metadata().items())[:MAX_METADATA_ENTRIES]
    }
    for key, value in (extra_metadata or {}).items():
        metadata.setdefault(key, _clip(value))  # the error's own fields win
    message = str(exc)
    extra: list[any_pb2.Any] = []
    retry_after = exc.retry_after()
    if retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.seconds = retry_after
        extra.append(_pack(retry))

    def build(kept: list[error_details_pb2.BadRequest.FieldViolation]) -> status_pb2.Status:
        info_metadata = dict(metadata)
        text, suffix = message, ""
        if violations:
            omitted = len(violations) - len(kept)
            info_metadata["violations"] = str(len(violations))
            if isinstance(exc, InvalidArgument):
                info_metadata["fields"] = _clip(",".join(v.field for v in kept), 1024)
                text = "; ".join(f"{v.field}: {v.description}" for v in kept)
            if omitted:
                info_metadata["violations_omitted"] = str(omitted)
                suffix = f" (and {omitted} more)"
        details = [
            _pack(
                error_details_pb2.ErrorInfo(
                    reason=exc.reason, domain=DOMAIN, metadata=info_metadata
                )
            )
        ]
        if kept:
            details.append(_pack(error_details_pb2.BadRequest(field_violations=kept)))
        return status_pb2.Status(
            code=code.value[0],
            message=_clip_bytes(text, MAX_MESSAGE_BYTES - len(suffix)) + suffix,
            details=[*details, *extra],
        )

    # Greedy by size (each violation costs its bytes plus a tag and a
    # length), then trimmed until the real encoding fits.
    kept: list[error_details_pb2.BadRequest.FieldViolation] = []
    used = build([]).ByteSize() + 64
    for violation in violations:
        used += violation.ByteSize() + 4
        if used > MAX_DETAILS_BYTES:
            break
        kept.append(violation)
    status = build(kept)
    while kept and status.ByteSize() > MAX_DETAILS_BYTES:
        kept.pop()
        status = build(kept)
    return rpc_status.to_status(status)


def internal_status(extra_metadata: Mapping[str, str] | None = None) -> grpc.Status:
    return rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.INTERNAL,
            message="internal error",
            details=[
                _pack(
                    error_details_pb2.ErrorInfo(
                        reason="INTERNAL", domain=DOMAIN, metadata=extra_metadata
                    )
                )
            ],
        )
    )
