"""Plain records that storage returns. No wire types here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar
from uuid import UUID

T = TypeVar("T")


class Role(enum.StrEnum):
    CLIENT = "CLIENT"
    OPERATOR = "OPERATOR"
    ADMIN = "ADMIN"


class SlotStatus(enum.StrEnum):
    AVAILABLE = "AVAILABLE"
    HOLD = "HOLD"
    BOOKED = "BOOKED"


class AppointmentStatus(enum.StrEnum):
    HOLD = "HOLD"
    CONFIRMED = "CONFIRMED"
    CANCELLED = "CANCELLED"
    NO_SHOW = "NO_SHOW"


class Priority(enum.StrEnum):
    NORMAL = "NORMAL"
    VIP = "VIP"
    URGENT = "URGENT"


class EventType(enum.StrEnum):
    HELD = "HELD"
    CONFIRMED = "CONFIRMED"
    CANCELLED = "CANCELLED"
    HOLD_EXPIRED = "HOLD_EXPIRED"
    NO_SHOW = "NO_SHOW"
    RESCHEDULED = "RESCHEDULED"


@dataclass(frozen=True)
class User:
    id: UUID
    email: str
    role: Role
    active: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class BookingPolicy:
    """A specialist's own limits; None follows the server-wide default,
    0 is no limit (storage/sql/policies.sql)."""

    min_notice_minutes: int | None = None
    max_advance_days: int | None = None
    cancellation_cutoff_hours: int | None = None


POLICY_FIELDS = ("min_notice_minutes", "max_advance_days", "cancellation_cutoff_hours")


@dataclass(frozen=True)
class Specialist:
    id: UUID
    full_name: str
    service_type: str
    active: bool
    created_at: datetime
    updated_at: datetime
    time_zone: str = "UTC"
    policy: BookingPolicy = field(default_factory=BookingPolicy)
    # Minutes kept free around each appointment (storage/sql/buffers.sql).
    buffer_before_minutes: int = 0
    buffer_after_minutes: int = 0


@dataclass(frozen=True)
class Slot:
    id: UUID
    specialist_id: UUID
    start_time: datetime
    end_time: datetime
    status: SlotStatus
    created_at: datetime
    # Seats (docs/seats.md): how many, and how many are free now.
    capacity: int = 1
    seats_available: int = 1


@dataclass(frozen=True)
class Appointment:
    id: UUID
    user_id: UUID
    specialist_id: UUID
    slot_id: UUID
    status: AppointmentStatus
    priority: Priority
    start_time: datetime
    end_time: datetime
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    # The seats of the slot it occupies (docs/seats.md).
    party_size: int = 1
    # The recurring series it was held in, if any.
    series_id: UUID | None = None


@dataclass(frozen=True, order=True)
class Position:
    """A place in the event stream: (transaction id, sequence), see docs/events.md."""

    xid: int
    seq: int

    @classmethod
    def start(cls) -> Position:
        return cls(0, 0)


@dataclass(frozen=True)
class AppointmentEvent:
    id: UUID
    position: Position
    type: EventType
    created_at: datetime
    old_status: AppointmentStatus | None
    appointment: Appointment
    actor_id: UUID | None
    reason: str | None
    previous_slot_id: UUID | None
    # A HELD event that is a waitlist offer names the entry.
    waitlist_entry_id: UUID | None = None


class WaitlistStatus(enum.StrEnum):
    ACTIVE = "ACTIVE"
    OFFERED = "OFFERED"
    FULFILLED = "FULFILLED"
    CANCELLED = "CANCELLED"
    DECLINED = "DECLINED"
    LAPSED = "LAPSED"
    EXPIRED = "EXPIRED"


@dataclass(frozen=True)
class WaitlistEntry:
    id: UUID
    user_id: UUID
    # Exactly one of the two is set.
    specialist_id: UUID | None
    service_type: str | None
    window_start: datetime
    window_end: datetime
    priority: Priority
    status: WaitlistStatus
    appointment_id: UUID | None
    created_at: datetime
    updated_at: datetime
    # The seats an offer holds, all or none.
    party_size: int = 1


@dataclass(frozen=True)
class AvailableSlot:
    """A slot free to hold, with what a caller needs to choose among them."""

    slot: Slot
    specialist_name: str
    service_type: str


@dataclass(frozen=True)
class EventFilter:
    specialist_id: UUID | None = None
    user_id: UUID | None = None
    appointment_id: UUID | None = None
    types: frozenset[EventType] = frozenset()

    def matches(self, event: AppointmentEvent) -> bool:
        a = event.appointment
        return (
            (self.specialist_id is None or a.specialist_id == self.specialist_id)
            and (self.user_id is None or a.user_id == self.user_id)
            and (self.appointment_id is None or a.id == self.appointment_id)
            and (not self.types or event.type in self.types)
        )


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    has_more: bool


@dataclass(frozen=True)
class Occurrence:
    """One occurrence of a series: held (appointment), or refused (reason
    and detail, the fields the error would have had)."""

    start_time: datetime
    slot_id: UUID | None
    appointment: Appointment | None
    reason: str | None
    detail: dict[str, str]


@dataclass(frozen=True)
class Series:
    id: UUID
    user_id: UUID
    specialist_id: UUID
    recurrence: str
    all_or_nothing: bool
    # False when all or nothing refused it: nothing is held.
    held: bool
    occurrences: list[Occurrence]
