"""Domain records <-> protobuf messages."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from booking.v1 import appointment_pb2 as apb
from booking.v1 import slot_pb2 as spb
from booking.v1 import specialist_pb2 as sppb
from booking.v1 import user_pb2 as upb
from booking.v1 import waitlist_pb2 as wpb
from storage import models as m

ROLES: dict[int, m.Role] = {
    upb.USER_ROLE_CLIENT: m.Role.CLIENT,
    upb.USER_ROLE_OPERATOR: m.Role.OPERATOR,
    upb.USER_ROLE_ADMIN: m.Role.ADMIN,
}
SLOT_STATUSES: dict[int, m.SlotStatus] = {
    spb.SLOT_STATUS_AVAILABLE: m.SlotStatus.AVAILABLE,
    spb.SLOT_STATUS_HOLD: m.SlotStatus.HOLD,
    spb.SLOT_STATUS_BOOKED: m.SlotStatus.BOOKED,
}
APPOINTMENT_STATUSES: dict[int, m.AppointmentStatus] = {
    apb.APPOINTMENT_STATUS_HOLD: m.AppointmentStatus.HOLD,
    apb.APPOINTMENT_STATUS_CONFIRMED: m.AppointmentStatus.CONFIRMED,
    apb.APPOINTMENT_STATUS_CANCELLED: m.AppointmentStatus.CANCELLED,
    apb.APPOINTMENT_STATUS_NO_SHOW: m.AppointmentStatus.NO_SHOW,
}
PRIORITIES: dict[int, m.Priority] = {
    apb.APPOINTMENT_PRIORITY_NORMAL: m.Priority.NORMAL,
    apb.APPOINTMENT_PRIORITY_VIP: m.Priority.VIP,
    apb.APPOINTMENT_PRIORITY_URGENT: m.Priority.URGENT,
}
EVENT_TYPES: dict[int, m.EventType] = {
    apb.APPOINTMENT_EVENT_TYPE_HELD: m.EventType.HELD,
    apb.APPOINTMENT_EVENT_TYPE_CONFIRMED: m.EventType.CONFIRMED,
    apb.APPOINTMENT_EVENT_TYPE_CANCELLED: m.EventType.CANCELLED,
    apb.APPOINTMENT_EVENT_TYPE_HOLD_EXPIRED: m.EventType.HOLD_EXPIRED,
    apb.APPOINTMENT_EVENT_TYPE_NO_SHOW: m.EventType.NO_SHOW,
    apb.APPOINTMENT_EVENT_TYPE_RESCHEDULED: m.EventType.RESCHEDULED,
}

WAITLIST_STATUSES: dict[int, m.WaitlistStatus] = {
    wpb.WAITLIST_ENTRY_STATUS_ACTIVE: m.WaitlistStatus.ACTIVE,
    wpb.WAITLIST_ENTRY_STATUS_OFFERED: m.WaitlistStatus.OFFERED,
    wpb.WAITLIST_ENTRY_STATUS_FULFILLED: m.WaitlistStatus.FULFILLED,
    wpb.WAITLIST_ENTRY_STATUS_CANCELLED: m.WaitlistStatus.CANCELLED,
    wpb.WAITLIST_ENTRY_STATUS_DECLINED: m.WaitlistStatus.DECLINED,
    wpb.WAITLIST_ENTRY_STATUS_LAPSED: m.WaitlistStatus.LAPSED,
    wpb.WAITLIST_ENTRY_STATUS_EXPIRED: m.WaitlistStatus.EXPIRED,
}


def _inverse(mapping: dict[int, object]) -> dict[object, int]:
    return {v: k for k, v in mapping.items()}


_ROLE_WIRE = _inverse(ROLES)  # type: ignore[arg-type]
_SLOT_STATUS_WIRE = _inverse(SLOT_STATUSES)  # type: ignore[arg-type]
_APPT_STATUS_WIRE = _inverse(APPOINTMENT_STATUSES)  # type: ignore[arg-type]
_PRIORITY_WIRE = _inverse(PRIORITIES)  # type: ignore[arg-type]
_EVENT_TYPE_WIRE = _inverse(EVENT_TYPES)  # type: ignore[arg-type]
_WAITLIST_STATUS_WIRE = _inverse(WAITLIST_STATUSES)  # type: ignore[arg-type]


_EPOCH_ORDINAL = datetime(1970, 1, 1).toordinal()

# Messages are built from plain dicts (nested ones for Timestamps): upb
# builds the whole tree in C, about twice as fast as constructing each
# Timestamp and sub-message in Python and having it copied into its parent.
# Typed Any because protobuf's stubs only know that a message field takes a
# message, while the runtime also takes a dict of its fields.
Fields = Any


def seconds_nanos(value: datetime) -> Fields:
    """A Timestamp's fields for `value`, by integer arithmetic on the
    calendar fields: several times cheaper than Timestamp.FromDatetime or
    timedelta arithmetic, and this runs for every time in every reply."""
    seconds = (
        (value.toordinal() - _EPOCH_ORDINAL) * 86400
        + value.hour * 3600
        + value.minute * 60
        + value.second
    )
    offset = value.utcoffset()  # None for asyncpg's naive edge-of-range values
    if offset:
        seconds -= offset.days * 86400 + offset.seconds
    return {"seconds": seconds, "nanos": value.microsecond * 1000}


def timestamp(value: datetime) -> Timestamp:
    return Timestamp(**seconds_nanos(value))


def user(u: m.User) -> upb.User:
    return upb.User(
        id=str(u.id),
        email=u.email,
        role=_ROLE_WIRE[u.role],  # type: ignore[arg-type]
        active=u.active,
        create_time=seconds_nanos(u.created_at),
        update_time=seconds_nanos(u.updated_at),
    )


def booking_policy(p: m.BookingPolicy) -> sppb.BookingPolicy:
    out = sppb.BookingPolicy()
    for name in m.POLICY_FIELDS:
        value = getattr(p, name)
        if value is not None:
            setattr(out, name, value)
    return out


def specialist(s: m.Specialist) -> sppb.Specialist:
    return sppb.Specialist(
        id=str(s.id),
        full_name=s.full_name,
        service_type=s.service_type,
        active=s.active,
        create_time=seconds_nanos(s.created_at),
        update_time=seconds_nanos(s.updated_at),
        time_zone=s.time_zone,
        booking_policy=booking_policy(s.policy),
        buffer_before_minutes=s.buffer_before_minutes,
        buffer_after_minutes=s.buffer_after_minutes,
    )


def slot_fields(s: m.Slot) -> Fields:
    return {
        "id": str(s.id),
        "specialist_id": str(s.specialist_id),
        "start_time": seconds_nanos(s.start_time),
        "end_time": seconds_nanos(s.end_time),
        "status": _SLOT_STATUS_WIRE[s.status],
        "create_time": seconds_nanos(s.created_at),
        "capacity": s.capacity,
        "seats_available": s.seats_available,
    }


def slot(s: m.Slot) -> spb.Slot:
    return spb.Slot(**slot_fields(s))


def appointment_fields(a: m.Appointment) -> Fields:
    out = {
        "id": str(a.id),
        "user_id": str(a.user_id),
        "specialist_id": str(a.specialist_id),
        "slot_id": str(a.slot_id),
        "status": _APPT_STATUS_WIRE[a.status],
        "priority": _PRIORITY_WIRE[a.priority],
        "start_time": seconds_nanos(a.start_time),
        "end_time": seconds_nanos(a.end_time),
        "create_time": seconds_nanos(a.created_at),
        "update_time": seconds_nanos(a.updated_at),
        "party_size": a.party_size,
    }
    if a.series_id is not None:
        out["series_id"] = str(a.series_id)
    if a.expires_at is not None:
        out["expire_time"] = seconds_nanos(a.expires_at)
    return out


def appointment(a: m.Appointment) -> apb.Appointment:
    return apb.Appointment(**appointment_fields(a))


def cursor(position: m.Position) -> str:
    """Event positions on the wire. Opaque to clients; readable for humans."""
    return f"{position.xid}-{position.seq}"


def _ascii_digits(text: str) -> bool:
    # str.isdigit() also accepts digits int() refuses, such as "²".
    return 0 < len(text) <= 20 and all("0" <= c <= "9" for c in text)


def parse_cursor(text: str) -> m.Position | None:
    xid, sep, seq = text.partition("-")
    if not sep or not _ascii_digits(xid) or not _ascii_digits(seq):
        return None
    if int(xid) >= 2**63 or int(seq) >= 2**63:
        return None
    return m.Position(int(xid), int(seq))


def event_fields(e: m.AppointmentEvent) -> Fields:
    return {
        "cursor": cursor(e.position),
        "id": str(e.id),
        "type": _EVENT_TYPE_WIRE[e.type],
        "create_time": seconds_nanos(e.created_at),
        "old_status": _APPT_STATUS_WIRE[e.old_status] if e.old_status else 0,
        "appointment": appointment_fields(e.appointment),
        "actor_id": str(e.actor_id) if e.actor_id else "",
        "reason": e.reason or "",
        "previous_slot_id": str(e.previous_slot_id) if e.previous_slot_id else "",
        "waitlist_entry_id": str(e.waitlist_entry_id) if e.waitlist_entry_id else "",
    }


def event(e: m.AppointmentEvent) -> apb.AppointmentEvent:
    return apb.AppointmentEvent(**event_fields(e))


def available_slot(a: m.AvailableSlot) -> spb.AvailableSlot:
    return spb.AvailableSlot(
        slot=slot(a.slot), specialist_full_name=a.specialist_name, service_type=a.service_type
    )


def waitlist_entry(w: m.WaitlistEntry) -> wpb.WaitlistEntry:
    out = wpb.WaitlistEntry(
        id=str(w.id),
        user_id=str(w.user_id),
        window_start_time=timestamp(w.window_start),
        window_end_time=timestamp(w.window_end),
        priority=_PRIORITY_WIRE[w.priority],  # type: ignore[arg-type]
        status=_WAITLIST_STATUS_WIRE[w.status],  # type: ignore[arg-type]
        appointment_id=str(w.appointment_id) if w.appointment_id else "",
        create_time=timestamp(w.created_at),
        update_time=timestamp(w.updated_at),
        party_size=w.party_size,
    )
    if w.specialist_id is not None:
        out.specialist_id = str(w.specialist_id)
    else:
        out.service_type = w.service_type or ""
    return out


def series_occurrence(o: m.Occurrence) -> apb.SeriesOccurrence:
    out = apb.SeriesOccurrence(
        start_time=timestamp(o.start_time),
        slot_id=str(o.slot_id) if o.slot_id else "",
        failure_reason=o.reason or "",
        failure_metadata=o.detail,
    )
    if o.appointment is not None:
        out.appointment.CopyFrom(appointment(o.appointment))
    return out
