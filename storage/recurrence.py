"""Recurrences for series (docs/seats.md): a subset of RFC 5545's RRULE,
expanded in the specialist's zone so that 10:00 stays 10:00 across clock
changes.

Pure computation, no database, like storage/wallclock.py (whose tz
database it uses). Supported: FREQ=DAILY or WEEKLY, INTERVAL, BYDAY (plain
two-letter days), and exactly one of COUNT and UNTIL. The first occurrence
is DTSTART, the first slot's local start; WEEKLY weeks begin on Monday
(WKST=MO). UNTIL is inclusive: a date, a local date-time, or a UTC one
(ending in Z).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

DAYS = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")
# The most occurrences an expansion visits looking for COUNT matches (a
# BYDAY that never matches must not loop forever).
_MAX_STEPS = 100_000


class RecurrenceError(ValueError):
    """The recurrence is malformed or unsupported; the message says why."""


@dataclass(frozen=True)
class Rule:
    freq: str
    interval: int
    by_day: tuple[int, ...]
    count: int | None
    until: datetime | date | None


def parse(text: str) -> Rule:
    parts: dict[str, str] = {}
    body = text.strip()
    if body.upper().startswith("RRULE:"):
        body = body[len("RRULE:") :]
    if not body:
        raise RecurrenceError("empty recurrence")
    for part in body.split(";"):
        key, sep, value = part.partition("=")
        key = key.strip().upper()
        if not sep or not value.strip():
            raise RecurrenceError(f"not NAME=VALUE: {part[:40]!r}")
        if key in parts:
            raise RecurrenceError(f"{key} given twice")
        parts[key] = value.strip().upper()
    unknown = set(parts) - {"FREQ", "INTERVAL", "BYDAY", "COUNT", "UNTIL", "WKST"}
    if unknown:
        raise RecurrenceError(f"unsupported parts: {', '.join(sorted(unknown))}")
    freq = parts.get("FREQ")
    if freq not in ("DAILY", "WEEKLY"):
        raise RecurrenceError("FREQ must be DAILY or WEEKLY")
    if parts.get("WKST", "MO") != "MO":
        raise RecurrenceError("only WKST=MO is supported")
    interval = _positive(parts.get("INTERVAL", "1"), "INTERVAL")
    by_day: tuple[int, ...] = ()
    if "BYDAY" in parts:
        names = parts["BYDAY"].split(",")
        if any(n not in DAYS for n in names):
            raise RecurrenceError("BYDAY takes two-letter days (MO,TU,...) without numbers")
        by_day = tuple(sorted({DAYS.index(n) for n in names}))
    if ("COUNT" in parts) == ("UNTIL" in parts):
        raise RecurrenceError("exactly one of COUNT and UNTIL is required")
    count = _positive(parts["COUNT"], "COUNT") if "COUNT" in parts else None
    until = _until(parts["UNTIL"]) if "UNTIL" in parts else None
    return Rule(freq, interval, by_day, count, until)


def _positive(value: str, name: str) -> int:
    if not value.isdigit() or int(value) < 1 or len(value) > 6:
        raise RecurrenceError(f"{name} must be a positive integer")
    return int(value)


def _until(value: str) -> datetime | date:
    try:
        if len(value) == 8:
            return datetime.strptime(value, "%Y%m%d").date()
        if value.endswith("Z"):
            return datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        return datetime.strptime(value, "%Y%m%dT%H%M%S")
    except ValueError as exc:
        raise RecurrenceError("UNTIL must be YYYYMMDD, YYYYMMDDTHHMMSS or ...Z") from exc


def expand(rule: Rule, dtstart: datetime, tz: ZoneInfo, limit: int) -> list[datetime]:
    """The occurrences' instants (UTC), DTSTART first, in order; at most
    `limit` + 1 of them, so a caller can tell "more than limit".

    `dtstart` is an aware instant; its wall time in `tz` is kept for every
    occurrence. A wall time that does not exist on a day (a spring gap) is
    taken as the instant the zone gives it (fold 0): no slot starts there,
    so that occurrence is reported without a slot."""
    local = dtstart.astimezone(tz)
    wall = local.replace(tzinfo=None)
    out: list[datetime] = []
    step = timedelta(days=rule.interval if rule.freq == "DAILY" else 7 * rule.interval)
    days = rule.by_day or ((wall.weekday(),) if rule.freq == "WEEKLY" else ())
    # Monday of DTSTART's week for WEEKLY, DTSTART's day for DAILY.
    anchor = wall - timedelta(days=wall.weekday()) if rule.freq == "WEEKLY" else wall
    for n in range(_MAX_STEPS):
        base = anchor + n * step
        candidates = (
            [base + timedelta(days=d) for d in days]
            if rule.freq == "WEEKLY"
            else ([base] if not days or base.weekday() in days else [])
        )
        for when in candidates:
            if when < wall:
                continue
            if _past_until(rule, when, tz):
                return out
            out.append(when.replace(tzinfo=tz).astimezone(UTC))
            if rule.count is not None and len(out) >= rule.count:
                return out
            if len(out) > limit:
                return out
    return out


def _past_until(rule: Rule, wall: datetime, tz: ZoneInfo) -> bool:
    until = rule.until
    if until is None:
        return False
    if isinstance(until, datetime):
        if until.tzinfo is not None:
            return wall.replace(tzinfo=tz) > until
        return wall > until
    return wall.date() > until
