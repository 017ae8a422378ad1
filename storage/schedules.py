"""SQL for working hours: a specialist's schedule, and its materialisation
into slots (storage/sql/schedules.sql; the computation is storage/wallclock.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from uuid import UUID

from storage import requests, slots, wallclock
from storage.database import Connection, Database, Intent, Isolation
from storage.errors import InvalidValue, ScheduleTooLarge, SpecialistNotFound
from storage.models import Slot, SlotStatus
from storage.wallclock import ExceptionKind, Schedule, ScheduleException, SkipReason, WeeklyRule

OPERATION = "MaterializeSchedule"


@dataclass(frozen=True)
class SpecialistSchedule:
    specialist_id: UUID
    time_zone: str
    schedule: Schedule


@dataclass(frozen=True)
class SkippedSlot:
    on_date: date
    local_start: str  # HH:MM
    local_end: str
    reason: SkipReason
    start_time: datetime | None
    end_time: datetime | None
    conflicting_slot_id: UUID | None


@dataclass(frozen=True)
class MaterializeReport:
    """What one materialisation created (or, in a preview, would create)
    and what it skipped, and why. A preview's slots have no id."""

    specialist_id: UUID
    time_zone: str
    tz_version: str
    created: list[Slot]
    skipped: list[SkippedSlot]
    preview: bool = False


async def _read(conn: Connection, specialist_id: UUID) -> Schedule:
    rules = await conn.fetch(
        "SELECT weekday, start_minute, end_minute, slot_minutes, gap_minutes,"
        " effective_from, effective_until FROM schedule_rules"
        " WHERE specialist_id = $1 ORDER BY position",
        specialist_id,
    )
    exceptions = await conn.fetch(
        "SELECT on_date, kind, start_minute, end_minute, slot_minutes, gap_minutes"
        " FROM schedule_exceptions WHERE specialist_id = $1 ORDER BY position",
        specialist_id,
    )
    return Schedule(
        rules=tuple(WeeklyRule(**dict(r)) for r in rules),
        exceptions=tuple(
            ScheduleException(**(dict(x) | {"kind": ExceptionKind(x["kind"])})) for x in exceptions
        ),
    )


async def get(db: Database, specialist_id: UUID) -> SpecialistSchedule:
    async def work(conn: Connection) -> SpecialistSchedule:
        zone = await conn.fetchval("SELECT time_zone FROM specialists WHERE id = $1", specialist_id)
        if zone is None:
            raise SpecialistNotFound(id=str(specialist_id))
        return SpecialistSchedule(specialist_id, zone, await _read(conn, specialist_id))

    return await db.run(work, intent=Intent.READ)


async def replace(db: Database, specialist_id: UUID, schedule: Schedule) -> SpecialistSchedule:
    """Replace the whole schedule at once. Slots already made stay."""
    rules = schedule.rules
    exceptions = schedule.exceptions

    async def work(conn: Connection) -> SpecialistSchedule:
        zone = await conn.fetchval(
            "SELECT time_zone FROM specialists WHERE id = $1 FOR NO KEY UPDATE", specialist_id
        )
        if zone is None:
            raise SpecialistNotFound(id=str(specialist_id))
        await conn.execute("DELETE FROM schedule_rules WHERE specialist_id = $1", specialist_id)
        await conn.execute(
            "DELETE FROM schedule_exceptions WHERE specialist_id = $1", specialist_id
        )
        await conn.execute(
            "INSERT INTO schedule_rules (specialist_id, position, weekday, start_minute,"
            " end_minute, slot_minutes, gap_minutes, effective_from, effective_until)"
            " SELECT $1, * FROM unnest($2::integer[], $3::smallint[], $4::integer[],"
            " $5::integer[], $6::integer[], $7::integer[], $8::date[], $9::date[])",
            specialist_id,
            list(range(len(rules))),
            [r.weekday for r in rules],
            [r.start_minute for r in rules],
            [r.end_minute for r in rules],
            [r.slot_minutes for r in rules],
            [r.gap_minutes for r in rules],
            [r.effective_from for r in rules],
            [r.effective_until for r in rules],
        )
        await conn.execute(
            "INSERT INTO schedule_exceptions (specialist_id, position, on_date, kind,"
            " start_minute, end_minute, slot_minutes, gap_minutes)"
            " SELECT $1, * FROM unnest($2::integer[], $3::date[], $4::text[], $5::integer[],"
            " $6::integer[], $7::integer[], $8::integer[])",
            specialist_id,
            list(range(len(exceptions))),
            [x.on_date for x in exceptions],
            [x.kind.value for x in exceptions],
            [x.start_minute for x in exceptions],
            [x.end_minute for x in exceptions],
            [x.slot_minutes for x in exceptions],
            [x.gap_minutes for x in exceptions],
        )
        return SpecialistSchedule(specialist_id, zone, await _read(conn, specialist_id))

    return await db.run(work, intent=Intent.WRITE)


def _to_json(report: MaterializeReport) -> str:
    return json.dumps(
        {
            "time_zone": report.time_zone,
            "tz_version": report.tz_version,
            "created": [
                [
                    str(s.id),
                    s.start_time.isoformat(),
                    s.end_time.isoformat(),
                    s.created_at.isoformat(),
                ]
                for s in report.created
            ],
            "skipped": [
                [
                    s.on_date.isoformat(),
                    s.local_start,
                    s.local_end,
                    s.reason.value,
                    s.start_time.isoformat() if s.start_time else None,
                    s.end_time.isoformat() if s.end_time else None,
                    str(s.conflicting_slot_id) if s.conflicting_slot_id else None,
                ]
                for s in report.skipped
            ],
        }
    )


def _from_json(specialist_id: UUID, text: str) -> MaterializeReport:
    data: dict[str, Any] = json.loads(text)

    def when(value: str | None) -> datetime | None:
        return datetime.fromisoformat(value) if value else None

    return MaterializeReport(
        specialist_id=specialist_id,
        time_zone=data["time_zone"],
        tz_version=data["tz_version"],
        created=[
            Slot(
                id=UUID(slot_id),
                specialist_id=specialist_id,
                start_time=datetime.fromisoformat(start),
                end_time=datetime.fromisoformat(end),
                status=SlotStatus.AVAILABLE,
                created_at=datetime.fromisoformat(created),
            )
            for slot_id, start, end, created in data["created"]
        ],
        skipped=[
            SkippedSlot(
                on_date=date.fromisoformat(on_date),
                local_start=local_start,
                local_end=local_end,
                reason=SkipReason(reason),
                start_time=when(start),
                end_time=when(end),
                conflicting_slot_id=UUID(conflict) if conflict else None,
            )
            for on_date, local_start, local_end, reason, start, end, conflict in data["skipped"]
        ],
    )


async def materialize(
    db: Database,
    specialist_id: UUID,
    *,
    first: date,
    end: date,
    actor_id: UUID,
    request_id: UUID | None,
    preview: bool,
    max_slots: int,
) -> MaterializeReport:
    """Create the slots the schedule gives for days first .. end (exclusive),
    all in one transaction, skipping those that exist, overlap or cannot be
    placed; a preview writes nothing.

    The specialist's row lock (FOR NO KEY UPDATE) waits out and then holds
    off every other insertion of its slots (they take FOR SHARE,
    storage/slots.py lock_specialists), and READ COMMITTED gives the
    statements after it a snapshot that sees everything committed before:
    so the overlap check here is exact, and the exclusion constraint is
    left as the backstop it is. A request id's report is stored with the
    slots as the request's result (storage/requests.py) and replayed to
    every copy of the request."""

    async def work(conn: Connection) -> MaterializeReport:
        if preview:
            row = await conn.fetchrow(
                "SELECT time_zone, now() AS now FROM specialists WHERE id = $1", specialist_id
            )
            if row is None:
                raise SpecialistNotFound(id=str(specialist_id))
        else:
            row = (await slots.lock_specialists(conn, [specialist_id], exclusive=True))[
                specialist_id
            ]
            if request_id is not None:
                stored = await requests.begin(
                    conn, OPERATION, actor_id, request_id, str(specialist_id), str(first), str(end)
                )
                if stored is not None:
                    return _from_json(specialist_id, stored)
        zone_name: str = row["time_zone"]
        schedule = await _read(conn, specialist_id)
        try:
            tz = wallclock.zone(zone_name)
        except KeyError:
            # Set through a server whose tz database knows a zone this one
            # does not (a newer release).
            raise InvalidValue(
                field="time_zone",
                description=f"{zone_name!r} is not in tz database {wallclock.tz_version()}",
            ) from None
        # Every slot lies within its local day, so a day's margin either side
        # of the range's local midnights covers any offset.
        window = (
            datetime.combine(first, time(), tz) - timedelta(days=1),
            datetime.combine(end, time(), tz) + timedelta(days=1),
        )
        found = await conn.fetch(
            "SELECT id, start_time, end_time FROM time_slots"
            " WHERE specialist_id = $1 AND deleted_at IS NULL"
            " AND end_time > $2 AND start_time < $3",
            specialist_id,
            *window,
        )
        existing = [wallclock.ExistingSlot(r["id"], r["start_time"], r["end_time"]) for r in found]
        create, skipped = wallclock.plan(
            schedule, tz, first, end, existing=existing, now=row["now"], limit=max_slots
        )
        new = [slots.NewSlot(specialist_id, c.start, c.end) for c in create]
        if preview:
            created = [
                Slot(
                    id=UUID(int=0),
                    specialist_id=specialist_id,
                    start_time=n.start_time,
                    end_time=n.end_time,
                    status=SlotStatus.AVAILABLE,
                    created_at=row["now"],
                )
                for n in new
            ]
        else:
            created = await slots.insert_slots(conn, new) if new else []
        report = MaterializeReport(
            specialist_id=specialist_id,
            time_zone=zone_name,
            tz_version=wallclock.tz_version(),
            created=created,
            preview=preview,
            skipped=[
                SkippedSlot(
                    on_date=s.local.on_date,
                    local_start=wallclock.format_minute(s.local.start_minute),
                    local_end=wallclock.format_minute(s.local.end_minute),
                    reason=s.reason,
                    start_time=s.start,
                    end_time=s.end,
                    conflicting_slot_id=s.conflicting_slot_id,
                )
                for s in skipped
            ],
        )
        if not preview and request_id is not None:
            # Copies of one request lock the same specialist and replay
            # above; the same id for another specialist at once fails here
            # on the key, and the retry finds it REQUEST_ID_REUSED.
            await requests.finish(conn, _to_json(report))
        return report

    try:
        return await db.run(
            work,
            intent=Intent.READ if preview else Intent.WRITE,
            isolation=Isolation.READ_COMMITTED,
        )
    except wallclock.TooManySlots as exc:
        raise ScheduleTooLarge(slots=f"more than {exc.limit}", max_slots=str(exc.limit)) from exc
