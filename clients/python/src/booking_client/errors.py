"""Rich error details (google.rpc.ErrorInfo and BadRequest) from a failed call."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True)
class ErrorDetails:
    """What the server said: status code and message, plus the ErrorInfo reason
    (e.g. ``SLOT_UNAVAILABLE``), domain and metadata, and any field violations."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    field_violations: tuple[FieldViolation, ...] = ()

    def __str__(self) -> str:
        text = f"{self.code.name}"
        if self.reason:
            text += f" {self.reason}"
        text += f": {self.message}"
        if self.field_violations:
            text += " (" + "; ".join(f"{v.field}: {v.description}" for v in self.field_violations)
            text += ")"
        return text


def error_details(err: grpc.RpcError) -> ErrorDetails:
    """Decode a failed call (``grpc.aio.AioRpcError`` or a sync ``grpc.RpcError``).

    Errors that carry no details (a connection failure, say) give an empty reason.
    """
    # A failed call is both an RpcError and a Call; the type says only the first.
    call = cast(Any, err)
    code: grpc.StatusCode = call.code()
    message: str = call.details() or ""
    trailing: list[tuple[str, str | bytes]] = list(call.trailing_metadata() or ())
    reason, domain, metadata, violations = "", "", {}, []
    for key, value in trailing:
        if key != DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
    return ErrorDetails(code, message, reason, domain, metadata, tuple(violations))
