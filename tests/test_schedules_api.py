"""ScheduleService end to end: time zones on specialists, a schedule set and
read back, and a month materialised into slots in one call across a clock
change, atomically and idempotently."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime, timedelta

import asyncpg
import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from booking.v1 import schedule_pb2 as pb
from booking.v1 import slot_pb2 as spb
from booking.v1 import specialist_pb2 as sppb
from storage import appointments, wallclock
from tests.support import Api, expect_failure, failure, running_server, ts

BERLIN = "Europe/Berlin"
WEEKDAYS = [
    pb.WEEKDAY_MONDAY,
    pb.WEEKDAY_TUESDAY,
    pb.WEEKDAY_WEDNESDAY,
    pb.WEEKDAY_THURSDAY,
    pb.WEEKDAY_FRIDAY,
]


def _spring_forward(zone: str) -> date:
    """The first day next year on which the zone's clocks go forward."""
    tz = wallclock.zone(zone)
    day = date(datetime.now(UTC).year + 1, 1, 1)
    while True:
        noon = datetime(day.year, day.month, day.day, 12, tzinfo=tz)
        nxt = noon + timedelta(days=1)
        if nxt.utcoffset() > noon.utcoffset():  # type: ignore[operator]
            return day + timedelta(days=1)
        day += timedelta(days=1)


def _month_of(day: date) -> tuple[str, str]:
    first = day.replace(day=1)
    end = (first + timedelta(days=32)).replace(day=1)
    return first.isoformat(), end.isoformat()


def _nine_to_five(slot_minutes: int = 30, gap: int = 0) -> pb.Schedule:
    return pb.Schedule(
        rules=[
            pb.WeeklyRule(
                weekday=d,
                start_time="09:00",
                end_time="17:00",
                slot_minutes=slot_minutes,
                gap_minutes=gap,
            )
            for d in WEEKDAYS
        ]
    )


async def _specialist(api: Api, zone: str = BERLIN) -> sppb.Specialist:
    reply = await api.specialists.CreateSpecialist(
        sppb.CreateSpecialistRequest(full_name="Dr. Lovelace", service_type="gp", time_zone=zone),
        metadata=api.md,
    )
    return reply.specialist


async def _set(api: Api, specialist_id: str, schedule: pb.Schedule) -> pb.Schedule:
    reply = await api.schedules.UpdateSchedule(
        pb.UpdateScheduleRequest(specialist_id=specialist_id, schedule=schedule), metadata=api.md
    )
    return reply.schedule


async def _materialize(
    api: Api, specialist_id: str, start: str, end: str, **kw: object
) -> pb.MaterializeScheduleResponse:
    return await api.schedules.MaterializeSchedule(
        pb.MaterializeScheduleRequest(
            specialist_id=specialist_id,
            start_date=start,
            end_date=end,
            **kw,  # type: ignore[arg-type]
        ),
        metadata=api.md,
    )


async def _all_slots(api: Api, specialist_id: str) -> list[spb.Slot]:
    out: list[spb.Slot] = []
    token = ""
    while True:
        reply = await api.slots.ListSlots(
            spb.ListSlotsRequest(specialist_id=specialist_id, page_size=1000, page_token=token),
            metadata=api.md,
        )
        out.extend(reply.slots)
        token = reply.next_page_token
        if not token:
            return out


def _local(slot: spb.Slot, zone: str) -> tuple[date, str, str]:
    tz = wallclock.zone(zone)
    start = slot.start_time.ToDatetime(tzinfo=UTC).astimezone(tz)
    end = slot.end_time.ToDatetime(tzinfo=UTC).astimezone(tz)
    return start.date(), start.strftime("%H:%M"), end.strftime("%H:%M")


async def test_a_specialist_has_a_time_zone_defaulting_to_utc(api: Api) -> None:
    plain = await api.specialist()
    assert plain.time_zone == "UTC"
    berlin = await _specialist(api)
    assert berlin.time_zone == BERLIN
    got = await api.specialists.GetSpecialist(
        sppb.GetSpecialistRequest(id=berlin.id), metadata=api.md
    )
    assert got.specialist.time_zone == BERLIN
    updated = await api.specialists.UpdateSpecialist(
        sppb.UpdateSpecialistRequest(
            specialist=sppb.Specialist(id=plain.id, time_zone="Asia/Kolkata"),
            update_mask=FieldMask(paths=["time_zone"]),
        ),
        metadata=api.md,
    )
    assert updated.specialist.time_zone == "Asia/Kolkata"
    listed = await api.specialists.ListSpecialists(sppb.ListSpecialistsRequest(), metadata=api.md)
    assert {s.id: s.time_zone for s in listed.specialists} == {
        plain.id: "Asia/Kolkata",
        berlin.id: BERLIN,
    }


async def test_an_unknown_time_zone_is_a_field_violation(api: Api) -> None:
    for zone in ("Europe/Atlantis", "CET-1", "europe/berlin", "../../etc/passwd"):
        async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT) as got:
            await _specialist(api, zone)
        assert got[0].violations == ["time_zone"]
    spec = await api.specialist()
    async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT) as got:
        await api.specialists.UpdateSpecialist(
            sppb.UpdateSpecialistRequest(
                specialist=sppb.Specialist(id=spec.id, time_zone="Nowhere/Town"),
                update_mask=FieldMask(paths=["time_zone"]),
            ),
            metadata=api.md,
        )
    assert got[0].violations == ["specialist.time_zone"]


async def test_a_schedule_is_stored_and_read_back(api: Api) -> None:
    spec = await _specialist(api)
    empty = await api.schedules.GetSchedule(
        pb.GetScheduleRequest(specialist_id=spec.id), metadata=api.md
    )
    assert not empty.schedule.rules and empty.schedule.time_zone == BERLIN
    wanted = _nine_to_five()
    wanted.rules[0].effective_from = "2030-01-01"
    wanted.rules.append(
        pb.WeeklyRule(
            weekday=pb.WEEKDAY_SATURDAY, start_time="20:00", end_time="24:00", slot_minutes=60
        )
    )
    wanted.exceptions.extend(
        [
            pb.ScheduleException(date="2030-12-24", kind=pb.SCHEDULE_EXCEPTION_KIND_OFF),
            pb.ScheduleException(
                date="2030-12-23",
                kind=pb.SCHEDULE_EXCEPTION_KIND_OFF,
                start_time="12:00",
                end_time="13:00",
            ),
            pb.ScheduleException(
                date="2030-12-28",
                kind=pb.SCHEDULE_EXCEPTION_KIND_EXTRA,
                start_time="10:00",
                end_time="12:00",
                slot_minutes=45,
                gap_minutes=15,
            ),
        ]
    )
    stored = await _set(api, spec.id, wanted)
    read = await api.schedules.GetSchedule(
        pb.GetScheduleRequest(specialist_id=spec.id), metadata=api.md
    )
    assert stored == read.schedule
    assert list(read.schedule.rules) == list(wanted.rules)
    assert list(read.schedule.exceptions) == list(wanted.exceptions)
    assert read.schedule.specialist_id == spec.id

    # Replacing it replaces all of it.
    await _set(api, spec.id, pb.Schedule())
    cleared = await api.schedules.GetSchedule(
        pb.GetScheduleRequest(specialist_id=spec.id), metadata=api.md
    )
    assert not cleared.schedule.rules and not cleared.schedule.exceptions


async def test_invalid_schedules_name_every_bad_field(api: Api) -> None:
    spec = await _specialist(api)
    bad = pb.Schedule(
        rules=[
            pb.WeeklyRule(start_time="09:00", end_time="17:00", slot_minutes=30),  # no weekday
            pb.WeeklyRule(
                weekday=pb.WEEKDAY_MONDAY, start_time="17:00", end_time="09:00", slot_minutes=30
            ),
            pb.WeeklyRule(
                weekday=pb.WEEKDAY_MONDAY, start_time="9:00", end_time="25:00", slot_minutes=0
            ),
            pb.WeeklyRule(
                weekday=pb.WEEKDAY_MONDAY,
                start_time="09:00",
                end_time="10:00",
                slot_minutes=30,
                gap_minutes=-5,
                effective_from="2030-02-30",
            ),
            pb.WeeklyRule(
                weekday=pb.WEEKDAY_MONDAY,
                start_time="09:00",
                end_time="10:00",
                slot_minutes=30,
                effective_from="2030-02-01",
                effective_until="2030-01-01",
            ),
        ],
        exceptions=[
            pb.ScheduleException(date="tomorrow", kind=pb.SCHEDULE_EXCEPTION_KIND_OFF),
            pb.ScheduleException(date="2030-01-01", kind=pb.SCHEDULE_EXCEPTION_KIND_EXTRA),
            pb.ScheduleException(
                date="2030-01-01", kind=pb.SCHEDULE_EXCEPTION_KIND_OFF, start_time="10:00"
            ),
        ],
    )
    async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT") as got:
        await _set(api, spec.id, bad)
    assert set(got[0].violations) == {
        "schedule.rules[0].weekday",
        "schedule.rules[1].end_time",
        "schedule.rules[2].start_time",
        "schedule.rules[2].end_time",
        "schedule.rules[2].slot_minutes",
        "schedule.rules[3].gap_minutes",
        "schedule.rules[3].effective_from",
        "schedule.rules[4].effective_until",
        "schedule.exceptions[0].date",
        "schedule.exceptions[1].start_time",
        "schedule.exceptions[1].end_time",
        "schedule.exceptions[1].slot_minutes",
        "schedule.exceptions[2].end_time",
    }
    # Nothing was stored.
    read = await api.schedules.GetSchedule(
        pb.GetScheduleRequest(specialist_id=spec.id), metadata=api.md
    )
    assert not read.schedule.rules
    async with expect_failure(grpc.StatusCode.NOT_FOUND, "SPECIALIST_NOT_FOUND"):
        await _set(api, str(uuid.uuid4()), _nine_to_five())


async def test_one_call_makes_a_month_across_the_clock_change(api: Api) -> None:
    change = _spring_forward(BERLIN)
    start, end = _month_of(change)
    spec = await _specialist(api)
    await _set(api, spec.id, _nine_to_five())

    report = await _materialize(api, spec.id, start, end)
    assert report.time_zone == BERLIN and report.tz_version == wallclock.tz_version()
    assert not report.skipped_slots
    slots = await _all_slots(api, spec.id)
    assert sorted(s.id for s in slots) == sorted(s.id for s in report.created_slots)
    by_day: dict[date, list[tuple[str, str]]] = {}
    for slot in slots:
        day, first, last = _local(slot, BERLIN)
        by_day.setdefault(day, []).append((first, last))
    weekdays = [
        d
        for d in (date.fromisoformat(start) + timedelta(n) for n in range(31))
        if d.month == change.month and d.isoweekday() <= 5
    ]
    assert sorted(by_day) == weekdays
    for day, times in by_day.items():
        assert len(times) == 16, day
        assert min(times)[0] == "09:00" and max(times)[1] == "17:00", day
    # 09:00 in Berlin is 08:00Z before the change and 07:00Z after it.
    utc_nine = {
        slot.start_time.ToDatetime(tzinfo=UTC).date(): slot.start_time.ToDatetime().strftime(
            "%H:%M"
        )
        for slot in slots
        if _local(slot, BERLIN)[1] == "09:00"
    }
    assert {utc_nine[d] for d in utc_nine if d < change} == {"08:00"}
    assert {utc_nine[d] for d in utc_nine if d > change} == {"07:00"}


async def test_a_second_run_creates_only_what_is_missing_and_a_replay_returns_the_first_report(
    api: Api,
) -> None:
    spec = await _specialist(api)
    await _set(api, spec.id, _nine_to_five(slot_minutes=60))
    start, end = "2030-03-04", "2030-03-09"  # Monday .. Friday
    request_id = str(uuid.uuid4())
    first = await _materialize(api, spec.id, start, end, request_id=request_id)
    assert len(first.created_slots) == 40 and not first.skipped_slots

    # The same request again: the same report, nothing new.
    replay = await _materialize(api, spec.id, start, end, request_id=request_id)
    assert replay == first
    assert len(await _all_slots(api, spec.id)) == 40

    # The same id for another range is a reused id.
    async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED"):
        await _materialize(api, spec.id, start, "2030-03-08", request_id=request_id)

    # Delete one slot, add one by hand that overlaps another; a new run
    # fills the gap and reports the rest.
    gone = first.created_slots[3]
    await api.slots.DeleteSlot(spb.DeleteSlotRequest(id=gone.id), metadata=api.md)
    blocked = first.created_slots[10]
    await api.slots.DeleteSlot(spb.DeleteSlotRequest(id=blocked.id), metadata=api.md)
    manual_start = blocked.start_time.ToDatetime(tzinfo=UTC) + timedelta(minutes=15)
    manual = await api.slot(spec.id, manual_start, minutes=30)
    second = await _materialize(api, spec.id, start, end, request_id=str(uuid.uuid4()))
    assert [(s.start_time, s.end_time) for s in second.created_slots] == [
        (gone.start_time, gone.end_time)
    ]
    reasons: dict[int, list[pb.SkippedSlot]] = {}
    for skipped in second.skipped_slots:
        reasons.setdefault(skipped.reason, []).append(skipped)
    assert {k: len(v) for k, v in reasons.items()} == {
        pb.SKIP_REASON_EXISTING_SLOT: 38,
        pb.SKIP_REASON_OVERLAPS_EXISTING_SLOT: 1,
    }
    (overlapping,) = reasons[pb.SKIP_REASON_OVERLAPS_EXISTING_SLOT]
    assert overlapping.conflicting_slot_id == manual.id
    assert overlapping.start_instant == blocked.start_time
    assert {s.conflicting_slot_id for s in reasons[pb.SKIP_REASON_EXISTING_SLOT]} == {
        s.id for s in first.created_slots
    } - {gone.id, blocked.id}
    # 40, less the two deleted, plus the one by hand and the one refilled.
    assert len(await _all_slots(api, spec.id)) == 40


async def test_preview_writes_nothing(api: Api) -> None:
    spec = await _specialist(api)
    await _set(api, spec.id, _nine_to_five())
    preview = await _materialize(api, spec.id, "2030-03-04", "2030-03-05", validate_only=True)
    assert len(preview.created_slots) == 16
    assert all(not s.id for s in preview.created_slots)
    assert preview.created_slots[0].start_time == ts(datetime(2030, 3, 4, 8, tzinfo=UTC))
    assert await _all_slots(api, spec.id) == []


async def test_the_horizon_is_bounded(database_url: str) -> None:
    async with running_server(database_url, schedule_max_days=31, schedule_max_slots=100) as srv:
        async with Api.connect(srv) as api:
            spec = await _specialist(api)
            await _set(api, spec.id, _nine_to_five())
            async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT) as got:
                await _materialize(api, spec.id, "2030-01-01", "2030-02-02")
            assert got[0].violations == ["end_date"]
            async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT) as got:
                await _materialize(api, spec.id, "2030-01-02", "2030-01-01")
            assert got[0].violations == ["end_date"]
            # A month of 16 slots a weekday is more than 100.
            async with expect_failure(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "SCHEDULE_TOO_LARGE"
            ) as got:
                await _materialize(api, spec.id, "2030-01-01", "2030-02-01")
            assert got[0].metadata["max_slots"] == "100"
            assert await _all_slots(api, spec.id) == []
            # A week fits.
            week = await _materialize(api, spec.id, "2030-01-07", "2030-01-12")
            assert len(week.created_slots) == 80


async def test_materialising_is_refused_for_an_inactive_or_missing_specialist(api: Api) -> None:
    spec = await _specialist(api)
    await _set(api, spec.id, _nine_to_five())
    await api.specialists.UpdateSpecialist(
        sppb.UpdateSpecialistRequest(
            specialist=sppb.Specialist(id=spec.id, active=False),
            update_mask=FieldMask(paths=["active"]),
        ),
        metadata=api.md,
    )
    async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "SPECIALIST_INACTIVE"):
        await _materialize(api, spec.id, "2030-03-04", "2030-03-05")
    async with expect_failure(grpc.StatusCode.NOT_FOUND, "SPECIALIST_NOT_FOUND"):
        await _materialize(api, str(uuid.uuid4()), "2030-03-04", "2030-03-05")


async def test_the_skipped_hour_is_reported_over_grpc(api: Api) -> None:
    change = _spring_forward("America/New_York")
    spec = await _specialist(api, "America/New_York")
    await _set(
        api,
        spec.id,
        pb.Schedule(
            rules=[
                pb.WeeklyRule(
                    weekday=change.isoweekday(),  # type: ignore[arg-type]
                    start_time="01:00",
                    end_time="04:00",
                    slot_minutes=60,
                )
            ]
        ),
    )
    report = await _materialize(
        api, spec.id, change.isoformat(), (change + timedelta(days=1)).isoformat()
    )
    assert [_local(s, "America/New_York")[1:] for s in report.created_slots] == [
        ("01:00", "03:00"),  # one real hour: 01:00 EST to 03:00 EDT
        ("03:00", "04:00"),
    ]
    (skipped,) = report.skipped_slots
    assert (skipped.date, skipped.start_time, skipped.end_time) == (
        change.isoformat(),
        "02:00",
        "03:00",
    )
    assert skipped.reason == pb.SKIP_REASON_NONEXISTENT_LOCAL_TIME
    assert not skipped.HasField("start_instant")


RUNS = 6


async def test_concurrent_runs_and_slot_inserts_never_collide(api: Api) -> None:
    """Runs of the same range, and a batch of hand-made slots inside it, all
    at once: every call succeeds, each slot is created once, and what the
    runs report skipped is exactly what another call created."""
    spec = await _specialist(api)
    await _set(api, spec.id, _nine_to_five())
    start, end = "2030-03-04", "2030-03-30"  # 20 weekdays x 16 slots
    # Ten minutes into 10:00 Berlin on Monday: two scheduled slots overlap it.
    manual = spb.BatchCreateSlotsRequest(
        requests=[
            spb.CreateSlotRequest(
                specialist_id=spec.id,
                start_time=ts(datetime(2030, 3, 4, 9, 10, tzinfo=UTC)),
                end_time=ts(datetime(2030, 3, 4, 9, 40, tzinfo=UTC)),
            )
        ]
    )

    async def run() -> pb.MaterializeScheduleResponse:
        return await _materialize(api, spec.id, start, end, request_id=str(uuid.uuid4()))

    async def batch() -> spb.BatchCreateSlotsResponse | None:
        try:
            return await api.slots.BatchCreateSlots(manual, metadata=api.md)
        except grpc.aio.AioRpcError as err:
            # A run got there first: the constraint refuses the overlap.
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err
            return None

    batching = asyncio.ensure_future(batch())
    reports = await asyncio.gather(*(run() for _ in range(RUNS)))
    hand_made = await batching
    created = [s for r in reports for s in r.created_slots]
    slots = await _all_slots(api, spec.id)
    assert sorted(s.id for s in slots) == sorted(
        [s.id for s in created] + ([s.id for s in hand_made.slots] if hand_made else [])
    )
    assert len(created) == (318 if hand_made else 320)
    every = {s.id for s in slots}
    for report in reports:
        for skipped in report.skipped_slots:
            assert skipped.reason in (
                pb.SKIP_REASON_EXISTING_SLOT,
                pb.SKIP_REASON_OVERLAPS_EXISTING_SLOT,
            )
            assert skipped.conflicting_slot_id in every
        assert len(report.created_slots) + len(report.skipped_slots) == 320
    ordered = sorted(slots, key=lambda s: s.start_time.ToDatetime())
    for a, b in zip(ordered, ordered[1:], strict=False):
        assert a.end_time.ToDatetime() <= b.start_time.ToDatetime()


async def test_one_request_id_for_two_specialists_at_once_runs_once(api: Api) -> None:
    """Copies of a request serialize on their specialist's lock and replay;
    the same id sent for two specialists at once cannot, and the one that
    loses is REQUEST_ID_REUSED with nothing created."""
    first, second = await _specialist(api), await _specialist(api)
    for spec in (first, second):
        await _set(api, spec.id, _nine_to_five())
    request_id = str(uuid.uuid4())

    async def run(specialist_id: str) -> str:
        try:
            await _materialize(
                api, specialist_id, "2030-03-04", "2030-03-30", request_id=request_id
            )
        except grpc.aio.AioRpcError as err:
            got = failure(err)
            return f"{got.code.name} {got.reason}"
        return "OK"

    outcomes = await asyncio.gather(run(first.id), run(second.id))
    assert sorted(outcomes) == ["INVALID_ARGUMENT REQUEST_ID_REUSED", "OK"]
    counts = [len(await _all_slots(api, s.id)) for s in (first, second)]
    assert sorted(counts) == [0, 320]


async def test_reports_are_forgotten_after_the_request_id_retention(
    api: Api, database_url: str
) -> None:
    spec = await _specialist(api)
    await _set(api, spec.id, _nine_to_five())
    old_id, new_id = str(uuid.uuid4()), str(uuid.uuid4())
    first = await _materialize(api, spec.id, "2030-03-04", "2030-03-05", request_id=old_id)
    await _materialize(api, spec.id, "2030-03-05", "2030-03-06", request_id=new_id)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '2 days'"
            " WHERE request_id = $1",
            uuid.UUID(old_id),
        )
    finally:
        await conn.close()
    assert api.server.db is not None
    assert await appointments.forget_request_ids(api.server.db, timedelta(hours=24), 100) == 1
    # Forgotten: the same id now runs as a new request, finding its slots made.
    again = await _materialize(api, spec.id, "2030-03-04", "2030-03-05", request_id=old_id)
    assert not again.created_slots
    assert {s.conflicting_slot_id for s in again.skipped_slots} == {
        s.id for s in first.created_slots
    }
    async with expect_failure(grpc.StatusCode.NOT_FOUND, "SPECIALIST_NOT_FOUND"):
        await api.schedules.GetSchedule(
            pb.GetScheduleRequest(specialist_id=str(uuid.uuid4())), metadata=api.md
        )
