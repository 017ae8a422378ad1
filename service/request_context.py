"""The request id (and trace id) of the call being served, for every log
line written while serving it and for its error details.

grpc.aio serves each call in its own task, so a contextvar set by the
interceptor is seen by everything that call runs, and by nothing else.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass

HEADER = "x-request-id"

# A caller's id is kept if it is short printable ASCII without spaces (it is
# written into logs and metadata); anything else is replaced by a fresh one.
_ACCEPTABLE = re.compile(r"[\x21-\x7e]{1,128}")


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    trace_id: str | None = None

    def metadata(self) -> dict[str, str]:
        """For ErrorInfo metadata. Not keyed ``request_id``: that is the
        idempotency key of the API's requests (REQUEST_ID_REUSED names it)."""
        out = {"x_request_id": self.request_id}
        if self.trace_id:
            out["trace_id"] = self.trace_id
        return out


_current: ContextVar[RequestContext | None] = ContextVar("booking_request", default=None)


def request_id_from(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    for key, value in metadata:
        if key == HEADER and isinstance(value, str) and _ACCEPTABLE.fullmatch(value):
            return value
    return new_id()


def new_id() -> str:
    """A random (version 4) UUID in its text form, built directly: five
    times cheaper than str(uuid.uuid4()), which is paid on every call."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def begin(request_id: str, trace_id: str | None = None) -> RequestContext:
    ctx = RequestContext(request_id, trace_id)
    _current.set(ctx)
    return ctx


def current() -> RequestContext | None:
    return _current.get()


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (and ``trace_id`` when tracing) to every record
    written while a call is served. Installed on the handlers, so records of
    every logger, ours and libraries', get them."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _current.get()
        if ctx is not None:
            record.request_id = ctx.request_id
            if ctx.trace_id:
                record.trace_id = ctx.trace_id
        return True
