"""The time left to the caller of the current request, for the database.

The service layer sets it from the RPC's deadline; Database.run reads it
and gives up (DeadlineExceeded, the statement cancelled on the server) when
it runs out, instead of working on for an answer nobody waits for. A
context variable, so storage needs no grpc: each RPC runs in its own task.
"""

from __future__ import annotations

import contextvars
import time

# Absolute, on the time.monotonic() clock; None: no deadline.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "booking_deadline", default=None
)


def set_remaining(seconds: float | None) -> contextvars.Token[float | None]:
    """The current request must be answered within `seconds` (None: no limit)."""
    return _deadline.set(None if seconds is None else time.monotonic() + seconds)


def reset(token: contextvars.Token[float | None]) -> None:
    _deadline.reset(token)


def remaining() -> float | None:
    """Seconds left to the current request's deadline, None if it has none."""
    at = _deadline.get()
    return None if at is None else at - time.monotonic()
