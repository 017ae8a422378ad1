"""Domain errors: what went wrong, with the fields a caller needs.

storage/ raises these from database errors (``raise ... from exc``): the
SQL functions' reasons (``SQL_REASONS``) and the constraints a statement can
violate (:func:`translate`) are both here, with the constraints a retry
resolves. The service layer maps each error to a gRPC status in a single
table (service/errors.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, ClassVar

import asyncpg


class BookingError(Exception):
    """Base of every error a client can cause or be told about."""

    reason: ClassVar[str] = "BOOKING_ERROR"

    def field_violations(self) -> list[tuple[str, str]]:
        """(field, description) pairs when the request itself was at fault."""
        return []

    def retry_after(self) -> int | None:
        """Seconds after which a retry may succeed, when that is known."""
        return None

    def metadata(self) -> dict[str, str]:
        """The error's fields as strings, for google.rpc.ErrorInfo.metadata."""
        out: dict[str, str] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = value.isoformat() if isinstance(value, datetime) else str(value)
        return out


@dataclass(eq=False)
class NotFound(BookingError):
    """Base for missing resources; `resource` names the kind."""

    resource: ClassVar[str] = "resource"
    id: str

    def __str__(self) -> str:
        return f"{self.resource} {self.id} not found"


class UserNotFound(NotFound):
    reason = "USER_NOT_FOUND"
    resource = "user"


class SpecialistNotFound(NotFound):
    reason = "SPECIALIST_NOT_FOUND"
    resource = "specialist"


class SlotNotFound(NotFound):
    reason = "SLOT_NOT_FOUND"
    resource = "slot"


class AppointmentNotFound(NotFound):
    reason = "APPOINTMENT_NOT_FOUND"
    resource = "appointment"


class SeriesNotFound(NotFound):
    reason = "SERIES_NOT_FOUND"
    resource = "series"


class WaitlistEntryNotFound(NotFound):
    reason = "WAITLIST_ENTRY_NOT_FOUND"
    resource = "waitlist entry"


class CalendarFeedNotFound(NotFound):
    """`id` is the subject's (user or specialist) id: a feed has no id of its own."""

    reason = "CALENDAR_FEED_NOT_FOUND"
    resource = "calendar feed of"


class WebhookEndpointNotFound(NotFound):
    reason = "WEBHOOK_ENDPOINT_NOT_FOUND"
    resource = "webhook endpoint"


@dataclass(eq=False)
class EmailTaken(BookingError):
    reason = "EMAIL_TAKEN"
    email: str

    def __str__(self) -> str:
        return f"a user with email {self.email!r} already exists"


@dataclass(eq=False)
class SlotOverlap(BookingError):
    reason = "SLOT_OVERLAP"
    specialist_id: str

    def __str__(self) -> str:
        return f"specialist {self.specialist_id} already has a slot overlapping this time"


@dataclass(eq=False)
class SlotUnavailable(BookingError):
    reason = "SLOT_UNAVAILABLE"
    slot_id: str
    status: str

    def __str__(self) -> str:
        return f"slot {self.slot_id} is {self.status}, not AVAILABLE"


@dataclass(eq=False)
class WrongState(BookingError):
    reason = "WRONG_STATE"
    appointment_id: str
    status: str
    transition: str

    def __str__(self) -> str:
        return f"cannot {self.transition} appointment {self.appointment_id}: it is {self.status}"


@dataclass(eq=False)
class WaitlistEntryWrongState(BookingError):
    """A waitlist entry transition its state does not allow (docs/waitlist.md)."""

    reason = "WAITLIST_ENTRY_WRONG_STATE"
    entry_id: str
    status: str
    transition: str

    def __str__(self) -> str:
        return f"cannot {self.transition} waitlist entry {self.entry_id}: it is {self.status}"


@dataclass(eq=False)
class HoldExpired(BookingError):
    reason = "HOLD_EXPIRED"
    appointment_id: str
    expire_time: str

    def __str__(self) -> str:
        return f"the hold on appointment {self.appointment_id} expired at {self.expire_time}"


@dataclass(eq=False)
class UserOverlap(BookingError):
    reason = "USER_OVERLAP"
    user_id: str
    conflicting_appointment_id: str

    def __str__(self) -> str:
        return (
            f"user {self.user_id} already has appointment "
            f"{self.conflicting_appointment_id} at an overlapping time"
        )


@dataclass(eq=False)
class UserInactive(BookingError):
    reason = "USER_INACTIVE"
    user_id: str

    def __str__(self) -> str:
        return f"user {self.user_id} is deactivated"


@dataclass(eq=False)
class SpecialistInactive(BookingError):
    reason = "SPECIALIST_INACTIVE"
    specialist_id: str

    def __str__(self) -> str:
        return f"specialist {self.specialist_id} is inactive"


@dataclass(eq=False)
class SlotNotStarted(BookingError):
    reason = "SLOT_NOT_STARTED"
    appointment_id: str
    start_time: str

    def __str__(self) -> str:
        return f"appointment {self.appointment_id} starts at {self.start_time}; it has not started"


@dataclass(eq=False)
class SpecialistMismatch(BookingError):
    reason = "SPECIALIST_MISMATCH"
    slot_id: str
    specialist_id: str

    def __str__(self) -> str:
        return f"slot {self.slot_id} does not belong to specialist {self.specialist_id}"


@dataclass(eq=False)
class SameSlot(BookingError):
    reason = "SAME_SLOT"
    appointment_id: str
    slot_id: str

    def __str__(self) -> str:
        return f"appointment {self.appointment_id} is already in slot {self.slot_id}"


@dataclass(eq=False)
class NotEnoughSeats(BookingError):
    """A hold for more seats than the slot has free (some are free: with
    none free it is SlotUnavailable)."""

    reason = "NOT_ENOUGH_SEATS"
    slot_id: str
    seats_available: int
    party_size: int

    def __str__(self) -> str:
        return f"slot {self.slot_id} has {self.seats_available} seats free, not {self.party_size}"


@dataclass(eq=False)
class WithinBuffer(BookingError):
    """The slot comes too close to another live appointment of the
    specialist: within the window that appointment keeps, its slot with the
    buffers before and after (storage/sql/buffers.sql)."""

    reason = "WITHIN_BUFFER"
    slot_id: str
    window_start_time: str
    window_end_time: str

    def __str__(self) -> str:
        return (
            f"slot {self.slot_id} is within the buffer of another appointment,"
            f" which keeps {self.window_start_time} to {self.window_end_time} free"
        )


@dataclass(eq=False)
class SeriesTooLarge(BookingError):
    """A series with more occurrences than the server allows in one call."""

    reason = "SERIES_TOO_LARGE"
    occurrences: str
    max_occurrences: str

    def __str__(self) -> str:
        return (
            f"the recurrence has {self.occurrences} occurrences, more than the"
            f" {self.max_occurrences} one series may hold"
        )


@dataclass(eq=False)
class SeriesTooLong(BookingError):
    """A series spanning more days than the server allows."""

    reason = "SERIES_TOO_LONG"
    days: str
    max_days: str

    def __str__(self) -> str:
        return f"the series spans {self.days} days, more than {self.max_days}"

    def field_violations(self) -> list[tuple[str, str]]:
        return [("recurrence", str(self))]


@dataclass(eq=False)
class CapacityBelowSeatsTaken(BookingError):
    reason = "CAPACITY_BELOW_SEATS_TAKEN"
    slot_id: str
    capacity: int
    seats_taken: int

    def __str__(self) -> str:
        return (
            f"slot {self.slot_id} has {self.seats_taken} seats taken;"
            f" its capacity cannot go down to {self.capacity}"
        )


@dataclass(eq=False)
class SlotInUse(BookingError):
    """DeleteSlot on a slot that is held or booked. (HoldSlot on such a slot
    is SlotUnavailable; the wire reasons differ, and clients rely on both.)"""

    reason = "SLOT_NOT_AVAILABLE"
    slot_id: str
    status: str

    def __str__(self) -> str:
        return f"slot {self.slot_id} is {self.status}; only an AVAILABLE slot can be deleted"


@dataclass(eq=False)
class OutsideBookingWindow(BookingError):
    """A CLIENT may not hold (or move into) a slot this soon or this far
    ahead. A bound that does not apply (limit 0) is None."""

    reason = "OUTSIDE_BOOKING_WINDOW"
    slot_id: str
    start_time: str
    min_notice_minutes: str
    max_advance_days: str
    earliest_start_time: str | None
    latest_start_time: str | None

    def __str__(self) -> str:
        bounds = []
        if self.earliest_start_time:
            bounds.append(f"from {self.earliest_start_time}")
        if self.latest_start_time:
            bounds.append(f"until {self.latest_start_time}")
        return (
            f"slot {self.slot_id} starts at {self.start_time}; clients may book slots"
            f" starting {' '.join(bounds)}"
        )


@dataclass(eq=False)
class OutsideCancellationWindow(BookingError):
    """A CLIENT may not cancel or reschedule a CONFIRMED appointment once
    its start is less than the cancellation cutoff away."""

    reason = "OUTSIDE_CANCELLATION_WINDOW"
    appointment_id: str
    transition: str
    start_time: str
    cancellation_cutoff_hours: str
    cutoff_time: str

    def __str__(self) -> str:
        return (
            f"cannot {self.transition} appointment {self.appointment_id}: it starts at"
            f" {self.start_time}, and clients may {self.transition} only until"
            f" {self.cutoff_time} ({self.cancellation_cutoff_hours} h before)"
        )


@dataclass(eq=False)
class ScheduleTooLarge(BookingError):
    """One materialisation would produce more slots than the server allows."""

    reason = "SCHEDULE_TOO_LARGE"
    slots: str
    max_slots: str

    def __str__(self) -> str:
        return (
            f"the schedule produces {self.slots} slots in this range, more than the"
            f" {self.max_slots} one call may create; ask for a shorter range"
        )


@dataclass(eq=False)
class RequestIdReused(BookingError):
    reason = "REQUEST_ID_REUSED"
    request_id: str
    operation: str

    def __str__(self) -> str:
        return (
            f"request_id {self.request_id} was already used for a different "
            f"{self.operation} request"
        )

    def field_violations(self) -> list[tuple[str, str]]:
        return [("request_id", str(self))]


@dataclass(eq=False)
class InvalidValue(BookingError):
    """A value the database refused (e.g. NUL in text) that validation missed."""

    reason = "INVALID_VALUE"
    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"

    def field_violations(self) -> list[tuple[str, str]]:
        return [(self.field, self.description)]


@dataclass(eq=False)
class InvalidCredentials(BookingError):
    reason = "INVALID_CREDENTIALS"

    def __str__(self) -> str:
        return "wrong email or password"


@dataclass(eq=False)
class LoginThrottled(BookingError):
    reason = "LOGIN_THROTTLED"
    retry_after_seconds: int

    def __str__(self) -> str:
        return f"too many failed logins; try again in {self.retry_after_seconds} s"

    def retry_after(self) -> int | None:
        return self.retry_after_seconds


@dataclass(eq=False)
class SignUpThrottled(LoginThrottled):
    """Too many anonymous sign-ups from one address."""

    reason = "SIGNUP_THROTTLED"

    def __str__(self) -> str:
        return f"too many sign-ups from this address; try again in {self.retry_after_seconds} s"


@dataclass(eq=False)
class CursorCompacted(BookingError):
    """A reader resumed from a cursor older than the event history kept:
    events after it have been pruned. `oldest_cursor` is the oldest cursor
    a reader may resume from (written like the cursors on the wire)."""

    reason = "CURSOR_COMPACTED"
    cursor: str
    oldest_cursor: str

    def __str__(self) -> str:
        return (
            f"cursor {self.cursor} is older than the event history kept;"
            f" the oldest cursor available is {self.oldest_cursor}"
        )


@dataclass(eq=False)
class CursorNotInHistory(BookingError):
    """A reader resumed from the position of an event the database does not
    have: it was on a history that a failover discarded (a promoted standby
    that had not received it). Events written since can lie below it, so
    resuming there could skip them. `restart_cursor` is where to start
    again without skipping anything; what was read after it may have
    changed, so the reader rebuilds its view from there."""

    reason = "CURSOR_NOT_IN_HISTORY"
    cursor: str
    restart_cursor: str

    def __str__(self) -> str:
        return (
            f"cursor {self.cursor} names an event this database does not have (lost in a"
            f" failover); start again from {self.restart_cursor}"
        )


@dataclass(eq=False)
class TransactionConflict(BookingError):
    """Retries of a serialization failure or deadlock ran out."""

    reason = "TRANSACTION_CONFLICT"
    attempts: int

    def __str__(self) -> str:
        return f"the change conflicted with concurrent ones {self.attempts} times; retry"


@dataclass(eq=False)
class DatabaseUnavailable(BookingError):
    reason = "DATABASE_UNAVAILABLE"

    def __str__(self) -> str:
        return "the database is unavailable"


@dataclass(eq=False)
class DatabaseTimeout(BookingError):
    reason = "DATABASE_TIMEOUT"

    def __str__(self) -> str:
        return "the database took too long to answer; retry"


@dataclass(eq=False)
class DeadlineExceeded(BookingError):
    """The caller's deadline passed before the database work finished; the
    work was cancelled (and rolled back)."""

    reason = "DEADLINE_EXCEEDED"

    def __str__(self) -> str:
        return "the deadline passed before the database answered"


@dataclass(eq=False)
class StandbyLeaseExpired(DatabaseUnavailable):
    """The node refused a commit or a replay: synchronous replication is
    configured, but no synchronous standby has replied to it within
    `max_age`. Either the node was frozen and may have been replaced (a
    resumed old primary, which must take no write), or its synchronous
    standby is gone until the HA manager picks another. Retryable, as any
    unavailable database (storage/sql/durability.sql)."""

    reason = "STANDBY_LEASE_EXPIRED"
    max_age: str

    def __str__(self) -> str:
        return f"no synchronous standby replied within {self.max_age}; retry"


@dataclass(eq=False)
class CommitDeadlinePassed(DatabaseUnavailable):
    """The node refused a transaction whose own time bound (`commit_by`,
    stamped by the service: when its caller stops waiting, plus a clock
    tolerance) had passed by the node's clock: it waited that long in the
    node's socket, as it does on a primary that was frozen and may have been
    replaced. Retryable, as any unavailable database
    (storage/sql/durability.sql)."""

    reason = "COMMIT_DEADLINE_PASSED"
    commit_by: str

    def __str__(self) -> str:
        return f"the transaction reached the database after its bound {self.commit_by}; retry"


# Reasons raised by the SQL functions (SQLSTATE BK001), with the detail keys
# each constructor takes.
SQL_REASONS: dict[str, type[BookingError]] = {
    cls.reason: cls
    for cls in (
        UserNotFound,
        SpecialistNotFound,
        SlotNotFound,
        AppointmentNotFound,
        WaitlistEntryNotFound,
        SeriesNotFound,
        WaitlistEntryWrongState,
        SlotUnavailable,
        WrongState,
        HoldExpired,
        UserOverlap,
        UserInactive,
        SpecialistInactive,
        SlotNotStarted,
        SpecialistMismatch,
        SameSlot,
        SlotInUse,
        NotEnoughSeats,
        CapacityBelowSeatsTaken,
        WithinBuffer,
        RequestIdReused,
        OutsideBookingWindow,
        OutsideCancellationWindow,
        StandbyLeaseExpired,
        CommitDeadlinePassed,
    )
}


# Two copies of one request racing can collide on their key itself: the
# retry then replays whatever the other copy stored (its success, or its
# remembered failure), or reports REQUEST_ID_REUSED when the parameters
# differ. Every operation's request ids are keys there (requests.sql).
# Two holds racing into each other's buffer (storage/sql/buffers.sql) meet
# on appointments_buffers_apart: the retry sees the winner and is refused
# WITHIN_BUFFER by the check.
RETRYABLE_CONSTRAINTS = frozenset({"idempotency_keys_pkey", "appointments_buffers_apart"})


def translate(exc: asyncpg.PostgresError) -> BookingError | None:
    """The domain error for a database error, or None if it is unexpected."""
    if exc.sqlstate == "BK001":
        return _from_sql_function(exc)
    constraint = getattr(exc, "constraint_name", None)
    if isinstance(exc, asyncpg.UniqueViolationError) and constraint == "users_email_key":
        return EmailTaken(email=_detail_value(exc) or "")
    if isinstance(exc, asyncpg.ExclusionViolationError) and constraint == "time_slots_no_overlap":
        # Key (specialist_id, tstzrange(...))=(<id>, [...)): the id comes first.
        return SlotOverlap(specialist_id=(_detail_value(exc) or "").split(",")[0])
    if isinstance(exc, asyncpg.CheckViolationError) and constraint == "time_slots_length_bounded":
        # Validation refuses it first; this is a slot written another way.
        return InvalidValue(field="end_time", description="at most 48 hours after start_time")
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        if constraint == "time_slots_specialist_id_fkey":
            return SpecialistNotFound(id=_detail_value(exc) or "")
        if constraint in ("appointments_user_id_fkey", "access_tokens_user_id_fkey"):
            return UserNotFound(id=_detail_value(exc) or "")
    if isinstance(
        exc, (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError)
    ):
        return InvalidValue(
            field=getattr(exc, "column_name", None) or "text",
            description="contains a character PostgreSQL cannot store (NUL)",
        )
    if isinstance(exc, (asyncpg.DatetimeFieldOverflowError, asyncpg.InvalidDatetimeFormatError)):
        return InvalidValue(
            field=getattr(exc, "column_name", None) or "timestamp",
            description="timestamp out of range",
        )
    return None


def _detail_value(exc: asyncpg.PostgresError) -> str | None:
    """The value from a 'Key (col)=(value) ...' detail, when there is one."""
    detail = getattr(exc, "detail", None) or ""
    start = detail.find(")=(")
    if start < 0:
        return None
    end = detail.find(")", start + 3)
    return detail[start + 3 : end if end > 0 else None]


def _from_sql_function(exc: asyncpg.PostgresError) -> BookingError:
    reason = str(getattr(exc, "message", ""))
    try:
        fields_: dict[str, Any] = json.loads(getattr(exc, "detail", None) or "{}")
    except ValueError:
        fields_ = {}
    cls = SQL_REASONS.get(reason)
    if cls is None:
        raise RuntimeError(f"SQL function raised unknown reason {reason!r}") from exc
    # The detail's keys are the error's fields (a test pins every
    # booking_fail call in storage/sql/ to this); a JSON null stays None.
    return cls(**{key: None if value is None else str(value) for key, value in fields_.items()})
