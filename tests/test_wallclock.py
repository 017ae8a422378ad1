"""Working hours across clock changes (storage/wallclock.py), in zones with
a spring-forward gap and a fall-back overlap (Europe/Berlin,
America/New_York), with a half-hour offset and DST (Australia/Adelaide),
and a half-hour offset without DST (Asia/Kolkata). The rules are the ones
docs/schedules.md states."""

from __future__ import annotations

import importlib.metadata
import uuid
import zoneinfo
from datetime import UTC, date, datetime, timedelta

import pytest

from storage import wallclock as w
from storage.wallclock import ExceptionKind, Schedule, ScheduleException, SkipReason, WeeklyRule

LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)
EVERY_DAY_9_TO_17 = Schedule(rules=tuple(WeeklyRule(d, 9 * 60, 17 * 60, 30) for d in range(1, 8)))
ROUND_THE_CLOCK = Schedule(rules=tuple(WeeklyRule(d, 0, 1440, 30) for d in range(1, 8)))

# (zone, date of a change, local time the clock skips or repeats).
SPRING_FORWARD = [
    ("Europe/Berlin", date(2027, 3, 28)),  # 02:00 CET -> 03:00 CEST
    ("America/New_York", date(2027, 3, 14)),  # 02:00 EST -> 03:00 EDT
    ("Australia/Adelaide", date(2027, 10, 3)),  # 02:00 ACST (+09:30) -> 03:00 ACDT (+10:30)
]
FALL_BACK = [
    ("Europe/Berlin", date(2027, 10, 31)),  # 03:00 CEST -> 02:00 CET
    ("America/New_York", date(2027, 11, 7)),  # 02:00 EDT -> 01:00 EST
    ("Australia/Adelaide", date(2027, 4, 4)),  # 03:00 ACDT -> 02:00 ACST
]


def _plan(
    schedule: Schedule, zone: str, first: date, days: int = 1
) -> tuple[list[w.Candidate], list[w.Skipped]]:
    return w.plan(
        schedule,
        w.zone(zone),
        first,
        first + timedelta(days=days),
        existing=[],
        now=LONG_AGO,
        limit=10_000,
    )


def _local(instant: datetime, zone: str) -> str:
    return instant.astimezone(w.zone(zone)).strftime("%H:%M")


def test_the_tz_database_is_the_pinned_tzdata_package() -> None:
    # pyproject.toml pins tzdata==2026.6, which carries IANA release 2026f;
    # the expected instants below are computed by those rules.
    assert importlib.metadata.version("tzdata") == "2026.6"
    assert w.tz_version() == "2026f"
    # Zones come from the package even where the host has no zone files.
    saved = zoneinfo.TZPATH
    zoneinfo.reset_tzpath(to=[])
    try:
        w.zone.cache_clear()
        berlin = w.zone("Europe/Berlin")
        assert datetime(2027, 7, 1, 12, tzinfo=berlin).utcoffset() == timedelta(hours=2)
    finally:
        zoneinfo.reset_tzpath(to=saved)
        w.zone.cache_clear()


@pytest.mark.parametrize("name", ["Europe/Berlin", "UTC", "Asia/Kolkata", "America/New_York"])
def test_known_zones_are_valid(name: str) -> None:
    assert w.valid_zone(name)
    assert str(w.zone(name)) == name


@pytest.mark.parametrize(
    "name", ["", "Mars/Olympus", "europe/berlin", "../etc/passwd", "localtime", "Europe/"]
)
def test_unknown_zones_are_not(name: str) -> None:
    assert not w.valid_zone(name)
    with pytest.raises(KeyError):
        w.zone(name)


@pytest.mark.parametrize(("zone", "day"), SPRING_FORWARD + FALL_BACK)
def test_a_nine_to_five_day_stays_nine_to_five_on_both_sides_of_a_change(
    zone: str, day: date
) -> None:
    for offset_days in (-1, 0, 1):
        on = day + timedelta(days=offset_days)
        create, skipped = _plan(EVERY_DAY_9_TO_17, zone, on)
        assert not skipped
        assert len(create) == 16
        assert _local(create[0].start, zone) == "09:00"
        assert _local(create[-1].end, zone) == "17:00"
        assert all(c.end - c.start == timedelta(minutes=30) for c in create)
        assert all(c.start.astimezone(w.zone(zone)).date() == on for c in create)
    # The same local hours are a different UTC hour after the change.
    before, _ = _plan(EVERY_DAY_9_TO_17, zone, day - timedelta(days=1))
    after, _ = _plan(EVERY_DAY_9_TO_17, zone, day + timedelta(days=1))
    assert before[0].start.time() != after[0].start.time()


def test_the_instants_of_nine_oclock_around_the_changes() -> None:
    def nine(zone: str, day: date) -> str:
        create, _ = _plan(EVERY_DAY_9_TO_17, zone, day)
        return create[0].start.strftime("%H:%MZ")

    assert [nine("Europe/Berlin", date(2027, 3, d)) for d in (27, 29)] == ["08:00Z", "07:00Z"]
    assert [nine("America/New_York", date(2027, 3, d)) for d in (13, 15)] == ["14:00Z", "13:00Z"]
    assert [nine("Australia/Adelaide", date(2027, 10, d)) for d in (2, 4)] == ["23:30Z", "22:30Z"]
    assert [nine("Asia/Kolkata", date(2027, m, 1)) for m in (1, 7)] == ["03:30Z", "03:30Z"]


@pytest.mark.parametrize(("zone", "day"), SPRING_FORWARD)
def test_slots_in_the_skipped_hour_are_skipped_and_reported(zone: str, day: date) -> None:
    create, skipped = _plan(ROUND_THE_CLOCK, zone, day)
    assert [(w.format_minute(s.local.start_minute), s.reason) for s in skipped] == [
        ("02:00", SkipReason.NONEXISTENT_LOCAL_TIME),
        ("02:30", SkipReason.NONEXISTENT_LOCAL_TIME),
    ]
    assert all(s.start is None for s in skipped)
    # The day has 23 hours: 46 slots, each 30 real minutes, none overlapping,
    # the last before the change ending where the first after it begins.
    assert len(create) == 46
    assert all(b.start >= a.end for a, b in zip(create, create[1:], strict=False))
    assert [_local(c.start, zone) for c in create[2:5]] == ["01:00", "01:30", "03:00"]
    assert create[3].end == create[4].start


@pytest.mark.parametrize(("zone", "day"), SPRING_FORWARD)
def test_a_slot_running_into_the_skipped_hour_is_skipped(zone: str, day: date) -> None:
    schedule = Schedule(rules=(WeeklyRule(day.isoweekday(), 90, 180, 30, gap_minutes=15),))
    # 01:30-02:00 ends as the clock jumps: kept. 02:15-02:45 starts in the gap.
    create, skipped = _plan(schedule, zone, day)
    assert [_local(c.start, zone) for c in create] == ["01:30"]
    assert [(w.format_minute(s.local.start_minute), s.reason) for s in skipped] == [
        ("02:15", SkipReason.NONEXISTENT_LOCAL_TIME)
    ]
    # 01:45-02:15 starts before the gap and runs into it.
    schedule = Schedule(rules=(WeeklyRule(day.isoweekday(), 105, 135, 30),))
    create, skipped = _plan(schedule, zone, day)
    assert not create
    assert [s.reason for s in skipped] == [SkipReason.NONEXISTENT_LOCAL_TIME]
    assert skipped[0].start is not None  # its start exists


@pytest.mark.parametrize(("zone", "day"), FALL_BACK)
def test_an_ambiguous_local_time_means_its_first_occurrence(zone: str, day: date) -> None:
    tz = w.zone(zone)
    create, skipped = _plan(ROUND_THE_CLOCK, zone, day)
    # Each local slot once: 48 slots on a 25-hour day; the repeated hour's
    # second pass has none.
    assert not skipped
    assert len(create) == 48
    repeated = 60 if zone == "America/New_York" else 120  # 01:00 or 02:00 happens twice
    ambiguous = [c for c in create if c.local.start_minute in (repeated, repeated + 30)]
    for slot in ambiguous:
        wall = slot.start.astimezone(tz)
        assert wall.fold == 0
        # The earlier instant: the same wall time with fold=1 comes an hour later.
        later = wall.replace(fold=1).astimezone(UTC)
        assert later - slot.start == timedelta(hours=1)
    # Real time between the last ambiguous slot's end and the next slot: the hour
    # the clock repeats.
    after = create[create.index(ambiguous[-1]) + 1]
    assert after.start - ambiguous[-1].end == timedelta(hours=1)


@pytest.mark.parametrize(("zone", "day"), FALL_BACK)
def test_a_slot_across_the_repeated_hour_is_skipped(zone: str, day: date) -> None:
    repeated_end = 120 if zone == "America/New_York" else 180
    schedule = Schedule(
        rules=(WeeklyRule(day.isoweekday(), repeated_end - 15, repeated_end + 15, 30),)
    )
    create, skipped = _plan(schedule, zone, day)
    assert not create
    assert [s.reason for s in skipped] == [SkipReason.CROSSES_CLOCK_CHANGE]


def test_exceptions_take_time_off_and_add_hours() -> None:
    monday = date(2027, 12, 20)
    christmas_eve = date(2027, 12, 24)
    schedule = Schedule(
        rules=tuple(WeeklyRule(d, 9 * 60, 17 * 60, 60) for d in range(1, 6)),
        exceptions=(
            ScheduleException(christmas_eve, ExceptionKind.OFF),
            ScheduleException(monday, ExceptionKind.OFF, 12 * 60, 13 * 60),
            ScheduleException(date(2027, 12, 25), ExceptionKind.EXTRA, 10 * 60, 12 * 60, 45, 15),
        ),
    )
    create, skipped = _plan(schedule, "Europe/Berlin", monday, days=7)
    by_day: dict[date, list[str]] = {}
    for c in create:
        by_day.setdefault(c.local.on_date, []).append(w.format_minute(c.local.start_minute))
    assert "12:00" not in by_day[monday] and len(by_day[monday]) == 7
    assert christmas_eve not in by_day
    assert by_day[date(2027, 12, 25)] == ["10:00", "11:00"]
    assert date(2027, 12, 26) not in by_day
    assert not skipped


def test_rules_apply_only_in_their_date_range_and_gaps_separate_slots() -> None:
    schedule = Schedule(
        rules=(
            WeeklyRule(1, 8 * 60, 10 * 60, 25, 5, effective_from=date(2027, 12, 13)),
            WeeklyRule(1, 14 * 60, 15 * 60, 60, effective_until=date(2027, 12, 6)),
        )
    )
    create, _ = _plan(schedule, "UTC", date(2027, 12, 6), days=8)
    assert [(c.local.on_date.day, w.format_minute(c.local.start_minute)) for c in create] == [
        (6, "14:00"),
        (13, "08:00"),
        (13, "08:30"),
        (13, "09:00"),
        (13, "09:30"),
    ]


def test_overlaps_and_the_past_are_reported_not_created() -> None:
    day = date(2027, 12, 6)
    schedule = Schedule(
        rules=(WeeklyRule(1, 9 * 60, 11 * 60, 60), WeeklyRule(1, 9 * 60 + 30, 10 * 60 + 30, 60))
    )
    same = w.ExistingSlot(
        uuid.uuid4(), datetime(2027, 12, 6, 9, tzinfo=UTC), datetime(2027, 12, 6, 10, tzinfo=UTC)
    )
    create, skipped = w.plan(
        schedule,
        w.zone("UTC"),
        day,
        day + timedelta(days=1),
        existing=[same],
        now=LONG_AGO,
        limit=100,
    )
    assert [w.format_minute(c.local.start_minute) for c in create] == ["10:00"]
    assert [
        (w.format_minute(s.local.start_minute), s.reason, s.conflicting_slot_id) for s in skipped
    ] == [
        ("09:00", SkipReason.EXISTING_SLOT, same.id),
        ("09:30", SkipReason.OVERLAPS_EXISTING_SLOT, same.id),
    ]
    create, skipped = w.plan(
        schedule,
        w.zone("UTC"),
        day,
        day + timedelta(days=1),
        existing=[],
        now=datetime(2027, 12, 6, 9, 45, tzinfo=UTC),
        limit=100,
    )
    assert [w.format_minute(c.local.start_minute) for c in create] == ["10:00"]
    assert [(w.format_minute(s.local.start_minute), s.reason) for s in skipped] == [
        ("09:00", SkipReason.STARTS_IN_THE_PAST),
        ("09:30", SkipReason.STARTS_IN_THE_PAST),
    ]
    # Two rules covering the same time: the later slot yields.
    create, skipped = _plan(schedule, "UTC", day)
    assert [w.format_minute(c.local.start_minute) for c in create] == ["09:00", "10:00"]
    assert [(w.format_minute(s.local.start_minute), s.reason) for s in skipped] == [
        ("09:30", SkipReason.OVERLAPS_SCHEDULED_SLOT)
    ]


def test_the_slot_limit_stops_the_layout_early() -> None:
    with pytest.raises(w.TooManySlots):
        w.local_slots(ROUND_THE_CLOCK, date(2027, 1, 1), date(2028, 1, 1), limit=1000)
    assert len(w.local_slots(ROUND_THE_CLOCK, date(2027, 1, 1), date(2027, 1, 2), limit=48)) == 48
