"""iCalendar (RFC 5545) text for a calendar feed.

Each appointment is one VEVENT: UID is the appointment id (stable across
reschedules, so a calendar app moves the event rather than adding one),
SEQUENCE counts its reschedules and cancellation (storage/sql/feeds.sql),
STATUS is TENTATIVE for a hold, CONFIRMED, or CANCELLED. Times are UTC
(`...Z`), so no VTIMEZONE is needed; the specialist's zone is named in
X-WR-TIMEZONE of a specialist feed for display.

Recurring series, once they exist, fit in `_event_lines` as one VEVENT
per series with RRULE and EXDATE (or one VEVENT per occurrence, each with
its own UID and RECURRENCE-ID); nothing else here depends on an event
being single.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from storage.feeds import Feed, FeedEntry
from storage.models import AppointmentStatus

PRODID = "-//booking-service//calendar feed//EN"
UID_DOMAIN = "booking-service"

_STATUS = {
    AppointmentStatus.HOLD: "TENTATIVE",
    AppointmentStatus.CONFIRMED: "CONFIRMED",
    # It took place as booked; the client did not come.
    AppointmentStatus.NO_SHOW: "CONFIRMED",
    AppointmentStatus.CANCELLED: "CANCELLED",
}


def utc(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def text(value: str) -> str:
    """A TEXT value (RFC 5545 3.3.11): backslash, semicolon, comma and
    newlines escaped; other control characters dropped."""
    out = []
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch == ";":
            out.append("\\;")
        elif ch == ",":
            out.append("\\,")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t" or ord(ch) >= 0x20 and ord(ch) != 0x7F:
            out.append(ch)
    return "".join(out)


def fold(line: str) -> bytes:
    """One content line, folded at 75 octets (RFC 5545 3.1) without
    splitting a UTF-8 sequence, with its CRLF."""
    data = line.encode()
    parts: list[bytes] = []
    limit = 75
    while len(data) > limit:
        cut = limit
        while cut > 0 and (data[cut] & 0xC0) == 0x80:
            cut -= 1
        parts.append(data[:cut])
        data = data[cut:]
        limit = 74  # the continuation's leading space counts
    parts.append(data)
    return b"\r\n ".join(parts) + b"\r\n"


def _event_lines(entry: FeedEntry, *, summary: str, stamp: datetime) -> Iterator[str]:
    yield "BEGIN:VEVENT"
    yield f"UID:{entry.appointment_id}@{UID_DOMAIN}"
    yield f"DTSTAMP:{utc(stamp)}"
    yield f"DTSTART:{utc(entry.start_time)}"
    yield f"DTEND:{utc(entry.end_time)}"
    yield f"CREATED:{utc(entry.created_at)}"
    yield f"LAST-MODIFIED:{utc(entry.updated_at)}"
    yield f"SEQUENCE:{entry.sequence}"
    yield f"STATUS:{_STATUS[entry.status]}"
    yield f"SUMMARY:{text(summary)}"
    yield "TRANSP:" + ("TRANSPARENT" if entry.status is AppointmentStatus.CANCELLED else "OPAQUE")
    yield "END:VEVENT"


def _calendar_lines(feed: Feed, stamp: datetime) -> Iterator[str]:
    yield "BEGIN:VCALENDAR"
    yield "VERSION:2.0"
    yield f"PRODID:{PRODID}"
    yield "CALSCALE:GREGORIAN"
    yield "METHOD:PUBLISH"
    if feed.subject.specialist_id is not None:
        yield f"X-WR-CALNAME:{text(feed.name or 'Appointments')}"
        if feed.time_zone:
            yield f"X-WR-TIMEZONE:{text(feed.time_zone)}"
    else:
        yield "X-WR-CALNAME:My appointments"
    for entry in feed.entries:
        # A specialist's feed names no client: it may be shown on a shared screen.
        summary = (
            "Appointment"
            if feed.subject.specialist_id is not None
            else f"Appointment with {entry.specialist_name}"
        )
        yield from _event_lines(entry, summary=summary, stamp=stamp)
    yield "END:VCALENDAR"


def render(feed: Feed, now: datetime | None = None) -> bytes:
    stamp = now or datetime.now(UTC)
    return b"".join(fold(line) for line in _calendar_lines(feed, stamp))
