"""SQL for appointments: the transitions (server-side functions in
storage/sql/, one round trip each on success, called as storage/functions.py
names them) and the reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from uuid import UUID

import asyncpg

from storage import functions as fn
from storage import requests
from storage.conditions import Conditions
from storage.database import Database, Intent
from storage.errors import AppointmentNotFound
from storage.events import event_from_row
from storage.flights import SlotFlights
from storage.models import Appointment, AppointmentEvent, AppointmentStatus, Page, Priority

_COLUMNS = (
    "a.id, a.user_id, a.specialist_id, a.time_slot_id, a.status, a.priority,"
    " s.start_time, s.end_time, a.expires_at, a.created_at, a.updated_at, a.party_size,"
    " a.series_id"
)


def _appointment(row: asyncpg.Record) -> Appointment:
    return Appointment(
        id=row["id"],
        user_id=row["user_id"],
        specialist_id=row["specialist_id"],
        slot_id=row["time_slot_id"],
        status=AppointmentStatus(row["status"]),
        priority=Priority(row["priority"]),
        start_time=row["start_time"],
        end_time=row["end_time"],
        expires_at=row["expires_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        party_size=row["party_size"],
        series_id=row["series_id"],
    )


async def _transition(
    db: Database,
    function: fn.Function,
    on_send: Callable[[], None] | None = None,
    **values: object,
) -> AppointmentEvent:
    """Run a transition; with a request id, every copy of the request gets
    one answer (storage/requests.py)."""
    return event_from_row(
        await requests.call(
            db,
            function.sql,
            function.values(**values),
            on_send,
            replayable=values.get("request_id") is not None,
        )
    )


async def hold(
    db: Database,
    flights: SlotFlights,
    *,
    slot_id: UUID,
    user_id: UUID,
    priority: Priority,
    actor_id: UUID | None,
    hold_ttl: timedelta,
    check_user_overlap: bool,
    request_id: UUID | None,
    policy_exempt: bool,
    party_size: int = 1,
) -> AppointmentEvent:
    """Hold `party_size` seats of a slot. Concurrent holds of one slot in
    this process reach the database one at a time, and those that wait are
    answered from the outcome when it shows every seat taken
    (storage/flights.py, through `flights`, the server's one coalescer);
    with a request id, that answer is recorded under
    the id in the database. A party of several seats goes to the database
    on its own: its refusal would say nothing about a smaller party, and
    the recorded refusal (booking_refuse_hold) is a one-seat request's."""

    async def run(on_send: Callable[[], None] | None) -> tuple[AppointmentEvent, bool]:
        """The hold, and whether it took the slot's last seat as far as
        its own answer shows: a new hold of one seat of a one-seat slot."""
        row = await requests.call(
            db,
            fn.HOLD_SLOT.sql,
            fn.HOLD_SLOT.values(
                slot_id=slot_id,
                user_id=user_id,
                priority=priority.value,
                actor_id=actor_id,
                hold_ttl=hold_ttl,
                check_user_overlap=check_user_overlap,
                request_id=request_id,
                policy_exempt=policy_exempt,
                party_size=party_size,
            ),
            on_send,
            replayable=request_id is not None,
        )
        return event_from_row(row), row["slot_capacity"] == 1 and party_size == 1

    if party_size != 1:
        # Events carry no party size (docs/seats.md): the appointment's is
        # the one asked for, which a replay under the same request id also
        # asked for (it is part of the request's fingerprint).
        event, _ = await run(None)
        return replace(event, appointment=replace(event.appointment, party_size=party_size))
    if request_id is None:
        event, _ = await flights.hold(slot_id, run, full=_last_seat)
        return event

    async def refuse(status: str) -> tuple[AppointmentEvent, bool]:
        event = await _transition(
            db,
            fn.REFUSE_HOLD,
            slot_id=slot_id,
            user_id=user_id,
            priority=priority.value,
            actor_id=actor_id,
            request_id=request_id,
            status=status,
        )
        return event, False

    event, _ = await flights.hold(slot_id, run, refuse, full=_last_seat)
    return event


def _last_seat(outcome: tuple[AppointmentEvent, bool]) -> bool:
    return outcome[1]


async def confirm(
    db: Database,
    appointment_id: UUID,
    *,
    owner_id: UUID | None,
    actor_id: UUID | None,
    request_id: UUID | None,
) -> AppointmentEvent:
    return await _transition(
        db,
        fn.CONFIRM,
        id=appointment_id,
        owner_id=owner_id,
        actor_id=actor_id,
        request_id=request_id,
    )


async def cancel(
    db: Database,
    appointment_id: UUID,
    *,
    owner_id: UUID | None,
    actor_id: UUID | None,
    reason: str | None,
    request_id: UUID | None,
    policy_exempt: bool,
) -> AppointmentEvent:
    return await _transition(
        db,
        fn.CANCEL,
        id=appointment_id,
        owner_id=owner_id,
        actor_id=actor_id,
        reason=reason,
        request_id=request_id,
        policy_exempt=policy_exempt,
    )


async def mark_no_show(
    db: Database, appointment_id: UUID, *, actor_id: UUID | None, request_id: UUID | None
) -> AppointmentEvent:
    return await _transition(
        db, fn.MARK_NO_SHOW, id=appointment_id, actor_id=actor_id, request_id=request_id
    )


async def reschedule(
    db: Database,
    appointment_id: UUID,
    *,
    new_slot_id: UUID,
    owner_id: UUID | None,
    actor_id: UUID | None,
    check_user_overlap: bool,
    request_id: UUID | None,
    policy_exempt: bool,
) -> AppointmentEvent:
    return await _transition(
        db,
        fn.RESCHEDULE,
        id=appointment_id,
        new_slot_id=new_slot_id,
        owner_id=owner_id,
        actor_id=actor_id,
        check_user_overlap=check_user_overlap,
        request_id=request_id,
        policy_exempt=policy_exempt,
    )


async def _count(db: Database, function: fn.Function, **values: object) -> int:
    """Run a batch function that returns how many rows it handled."""
    sql = function.sql
    args = function.values(**values)

    return int(await db.fetchval(sql, *args, intent=Intent.WRITE))


async def expire_holds(db: Database, limit: int) -> int:
    """Release up to `limit` lapsed holds; returns how many were released."""
    return await _count(db, fn.EXPIRE_HOLDS, limit=limit)


async def forget_request_ids(db: Database, retention: timedelta, limit: int) -> int:
    """Forget up to `limit` request ids older than `retention`; returns how
    many were forgotten."""
    return await _count(db, fn.FORGET_REQUEST_IDS, retention=retention, limit=limit)


async def prune_events(db: Database, retention: timedelta, limit: int) -> int:
    """Delete up to `limit` events older than `retention` (docs/events.md,
    "Retention"); returns how many were deleted. Another replica pruning at
    the same moment makes this one do nothing."""
    return await _count(db, fn.PRUNE_EVENTS, retention=retention, limit=limit)


async def get(db: Database, appointment_id: UUID, *, owner_id: UUID | None = None) -> Appointment:
    """`owner_id` restricts the lookup to one user's appointments; another
    user's appointment is reported as missing."""
    row = await db.fetchrow(
        f"SELECT {_COLUMNS} FROM appointments a JOIN time_slots s ON s.id = a.time_slot_id"
        " WHERE a.id = $1 AND ($2::uuid IS NULL OR a.user_id = $2)",
        appointment_id,
        owner_id,
        intent=Intent.READ,
    )
    if row is None:
        raise AppointmentNotFound(id=str(appointment_id))
    return _appointment(row)


async def list_(
    db: Database,
    *,
    user_id: UUID | None,
    specialist_id: UUID | None,
    status: AppointmentStatus | None,
    window_start: datetime | None,
    window_end: datetime | None,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> Page[Appointment]:
    where = Conditions()
    where.add_if(user_id, "a.user_id = {}")
    where.add_if(specialist_id, "a.specialist_id = {}")
    where.add_if(status.value if status else None, "a.status = {}::appointment_status")
    where.add_if(window_end, "s.start_time < {}")
    if after is not None:
        where.add("(s.start_time, a.id) > ({}, {})", after[0], after[1])
    source = f"SELECT {_COLUMNS} FROM appointments a JOIN time_slots s ON s.id = a.time_slot_id"
    if window_start is None:
        body = f"{source}{where.sql(' WHERE ')}"
    else:
        # The slot's end kept on the appointment (a.slot_end) bounds a user's
        # range of appointments_user_slot_end to those ending after the
        # window starts, so the user's past is never read. Rows written
        # before the column and not yet backfilled (NULL) are the second
        # arm, compared by their slot: the same index's empty range once
        # `migrate backfill` is done. Two arms, because one OR across them
        # would be planned as a filter over all of the user's appointments.
        start = where.arg(window_start)
        rest = where.sql()
        body = (
            f"{source} WHERE a.slot_end > {start}{rest}"
            f" UNION ALL {source} WHERE a.slot_end IS NULL AND s.end_time > {start}{rest}"
        )
    sql = f"{body} ORDER BY start_time, id LIMIT {where.arg(limit + 1)}"
    rows = await db.fetch(sql, *where.args, intent=Intent.READ)
    return Page([_appointment(r) for r in rows[:limit]], has_more=len(rows) > limit)
