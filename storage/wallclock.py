"""Working hours in local time, turned into slots in UTC.

Pure computation, no database: storage/schedules.py reads the schedule and
the existing slots, calls this, and writes the result. The rules for local
times that do not exist or occur twice are docs/schedules.md's, and the
tests hold every one of them in several zones.

The tz database is the ``tzdata`` package's, always, never the host's zone
files: the version is pinned with the release (pyproject.toml), so every
replica, every host and the tests compute the same instants for the same
schedule, and a rule change in a new tz release arrives as a deliberate
upgrade, not as a host package update.
"""

from __future__ import annotations

import bisect
import enum
import importlib
import importlib.resources
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from uuid import UUID
from zoneinfo import ZoneInfo

MINUTES_PER_DAY = 1440
_EPSILON = timedelta(microseconds=1)


def tz_version() -> str:
    """The IANA release of the tz database in use, e.g. "2026f"."""
    return str(importlib.import_module("tzdata").IANA_VERSION)


@cache
def zone_names() -> frozenset[str]:
    """Every zone the tz database knows (its canonical names and links)."""
    text = importlib.resources.files("tzdata").joinpath("zones").read_text()
    return frozenset(text.split())


def valid_zone(name: str) -> bool:
    return name in zone_names()


@cache
def zone(name: str) -> ZoneInfo:
    """The zone called `name`, from the packaged tz database; KeyError if
    there is none."""
    if not valid_zone(name):
        raise KeyError(name)
    resource = importlib.resources.files("tzdata.zoneinfo")
    for part in name.split("/"):
        resource = resource.joinpath(part)
    with resource.open("rb") as data:
        return ZoneInfo.from_file(data, key=name)


def format_minute(minute: int) -> str:
    """Minutes after midnight as HH:MM (1440 is 24:00)."""
    return f"{minute // 60:02d}:{minute % 60:02d}"


class ExceptionKind(enum.StrEnum):
    OFF = "OFF"
    EXTRA = "EXTRA"


@dataclass(frozen=True)
class WeeklyRule:
    weekday: int  # ISO: 1 Monday .. 7 Sunday
    start_minute: int
    end_minute: int
    slot_minutes: int
    gap_minutes: int = 0
    effective_from: date | None = None  # inclusive
    effective_until: date | None = None  # inclusive

    def applies(self, day: date) -> bool:
        return (
            day.isoweekday() == self.weekday
            and (self.effective_from is None or day >= self.effective_from)
            and (self.effective_until is None or day <= self.effective_until)
        )


@dataclass(frozen=True)
class ScheduleException:
    on_date: date
    kind: ExceptionKind
    # None (OFF only): the whole day.
    start_minute: int | None = None
    end_minute: int | None = None
    # EXTRA only.
    slot_minutes: int | None = None
    gap_minutes: int | None = None


@dataclass(frozen=True)
class Schedule:
    rules: tuple[WeeklyRule, ...] = ()
    exceptions: tuple[ScheduleException, ...] = ()


class SkipReason(enum.StrEnum):
    # A slot with exactly these times is already there.
    EXISTING_SLOT = "EXISTING_SLOT"
    # An existing slot overlaps it (the exclusion constraint would refuse it).
    OVERLAPS_EXISTING_SLOT = "OVERLAPS_EXISTING_SLOT"
    # Another slot of the same schedule, earlier in time order, overlaps it
    # (two rules, or a rule and extra hours, cover the same time).
    OVERLAPS_SCHEDULED_SLOT = "OVERLAPS_SCHEDULED_SLOT"
    # It starts, or runs, in local time a clock change skips (spring forward).
    NONEXISTENT_LOCAL_TIME = "NONEXISTENT_LOCAL_TIME"
    # It runs across a clock change that repeats local time (fall back), so
    # its length on the clock is not its real length.
    CROSSES_CLOCK_CHANGE = "CROSSES_CLOCK_CHANGE"
    # It would start before the database's now().
    STARTS_IN_THE_PAST = "STARTS_IN_THE_PAST"


@dataclass(frozen=True)
class LocalSlot:
    """One slot as the schedule lays it out on the local clock."""

    on_date: date
    start_minute: int
    end_minute: int


@dataclass(frozen=True)
class Candidate:
    local: LocalSlot
    start: datetime  # UTC
    end: datetime  # UTC


@dataclass(frozen=True)
class Skipped:
    local: LocalSlot
    reason: SkipReason
    # UTC; None when the local start does not exist.
    start: datetime | None = None
    end: datetime | None = None
    conflicting_slot_id: UUID | None = None


@dataclass(frozen=True)
class ExistingSlot:
    id: UUID
    start: datetime
    end: datetime


class TooManySlots(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} slots")
        self.limit = limit


def _days(first: date, end: date) -> Iterator[date]:
    day = first
    while day < end:
        yield day
        day += timedelta(days=1)


def _windows(schedule: Schedule, day: date) -> list[tuple[int, int, int, int]]:
    """(start, end, slot, gap) minutes of the hours worked on `day`."""
    out = [
        (r.start_minute, r.end_minute, r.slot_minutes, r.gap_minutes)
        for r in schedule.rules
        if r.applies(day)
    ]
    for x in schedule.exceptions:
        if x.on_date == day and x.kind is ExceptionKind.EXTRA:
            assert x.start_minute is not None and x.end_minute is not None
            assert x.slot_minutes is not None
            out.append((x.start_minute, x.end_minute, x.slot_minutes, x.gap_minutes or 0))
    return out


def _off(schedule: Schedule, day: date) -> list[tuple[int, int]]:
    return [
        (x.start_minute or 0, MINUTES_PER_DAY if x.end_minute is None else x.end_minute)
        for x in schedule.exceptions
        if x.on_date == day and x.kind is ExceptionKind.OFF
    ]


def local_slots(schedule: Schedule, first: date, end: date, limit: int) -> list[LocalSlot]:
    """The slots of days first .. end (exclusive) on the local clock, in
    time order, without those in time off. TooManySlots past `limit`."""
    out: list[LocalSlot] = []
    for day in _days(first, end):
        off = _off(schedule, day)
        day_slots = []
        for start, stop, length, gap in _windows(schedule, day):
            minute = start
            while minute + length <= stop:
                if not any(minute < o_end and o_start < minute + length for o_start, o_end in off):
                    day_slots.append(LocalSlot(day, minute, minute + length))
                    if len(out) + len(day_slots) > limit:
                        raise TooManySlots(limit)
                minute += length + gap
        out.extend(sorted(day_slots, key=lambda s: (s.start_minute, s.end_minute)))
    return out


def _wall(day: date, minute: int) -> datetime:
    # Naive: a reading of the local clock. 1440 is the next day's 00:00.
    return datetime.combine(day, time()) + timedelta(minutes=minute)


def to_utc(slot: LocalSlot, tz: ZoneInfo) -> Candidate | Skipped:
    """Where a local slot falls in real time.

    An ambiguous local start (a time the clock shows twice) means its first
    occurrence, the earlier instant (fold=0). The slot then lasts its
    length in real time, and is kept only if the clock's offset from UTC is
    the same at its start and just before its end, so it also reads as
    start .. end on the local clock. Otherwise it crosses a clock change
    and is skipped: NONEXISTENT_LOCAL_TIME when the change skips local time
    (or the start itself is skipped), CROSSES_CLOCK_CHANGE when it repeats
    local time."""
    wall = _wall(slot.on_date, slot.start_minute)
    local = wall.replace(tzinfo=tz, fold=0)
    start = local.astimezone(UTC)
    if start.astimezone(tz).replace(tzinfo=None) != wall:
        return Skipped(slot, SkipReason.NONEXISTENT_LOCAL_TIME)
    end = start + timedelta(minutes=slot.end_minute - slot.start_minute)
    before = start.astimezone(tz).utcoffset()
    after = (end - _EPSILON).astimezone(tz).utcoffset()
    assert before is not None and after is not None
    if before == after:
        return Candidate(slot, start, end)
    reason = (
        SkipReason.NONEXISTENT_LOCAL_TIME if after > before else SkipReason.CROSSES_CLOCK_CHANGE
    )
    return Skipped(slot, reason, start, end)


def plan(
    schedule: Schedule,
    tz: ZoneInfo,
    first: date,
    end: date,
    *,
    existing: Sequence[ExistingSlot],
    now: datetime,
    limit: int,
) -> tuple[list[Candidate], list[Skipped]]:
    """The slots to create for days first .. end (exclusive), and those
    skipped with the reason. `existing` are the specialist's slots around
    the range; they never overlap one another (the exclusion constraint)."""
    ordered = sorted(existing, key=lambda s: s.start)
    ends = [s.end for s in ordered]
    create: list[Candidate] = []
    skipped: list[Skipped] = []
    candidates: list[Candidate] = []
    for local in local_slots(schedule, first, end, limit):
        placed = to_utc(local, tz)
        if isinstance(placed, Skipped):
            skipped.append(placed)
        else:
            candidates.append(placed)
    for item in sorted(candidates, key=lambda c: (c.start, c.end)):
        at = bisect.bisect_right(ends, item.start)
        clash = ordered[at] if at < len(ordered) and ordered[at].start < item.end else None
        if item.start < now:
            skipped.append(Skipped(item.local, SkipReason.STARTS_IN_THE_PAST, item.start, item.end))
        elif clash is not None:
            same = clash.start == item.start and clash.end == item.end
            reason = SkipReason.EXISTING_SLOT if same else SkipReason.OVERLAPS_EXISTING_SLOT
            skipped.append(Skipped(item.local, reason, item.start, item.end, clash.id))
        elif create and item.start < create[-1].end:
            skipped.append(
                Skipped(item.local, SkipReason.OVERLAPS_SCHEDULED_SLOT, item.start, item.end)
            )
        else:
            create.append(item)
    skipped.sort(key=lambda s: (s.local.on_date, s.local.start_minute, s.local.end_minute))
    return create, skipped
