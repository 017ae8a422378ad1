"""SQL for recurring series (storage/sql/series.sql): one transaction reads
the first slot and its specialist's zone, expands the recurrence there
(storage/recurrence.py) and holds every occurrence.

A request id is a key of the one request-id mechanism (storage/requests.py,
storage/sql/requests.sql): the transaction looks it up first, so a copy is
answered with the first copy's series, or its failure, whatever has changed
since; a new request's business failure is stored under its key in the same
transaction, which then commits instead of rolling back."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from uuid import UUID

import asyncpg

from storage import errors, recurrence, requests, wallclock
from storage import functions as fn
from storage.appointments import _COLUMNS, _appointment
from storage.database import Connection, Database, Intent
from storage.errors import SeriesTooLarge, SeriesTooLong, SlotNotFound
from storage.models import Appointment, Occurrence, Priority, Series

_FIRST_SLOT = (
    "SELECT s.start_time, p.time_zone FROM time_slots s"
    " JOIN specialists p ON p.id = s.specialist_id"
    " WHERE s.id = $1 AND s.deleted_at IS NULL"
)
OPERATION = "HoldSeries"
_OUTCOME = fn.REQUEST_OUTCOME.statement(
    {
        "p_operation": f"'{OPERATION}'",
        "p_actor_id": "$1",
        "p_request_id": "$2",
        "p_params": fn.SERIES_REQUEST_PARAMS.call(
            {
                "p_first_slot_id": "$3",
                "p_user_id": "$4",
                "p_priority": "$5::appointment_priority",
                "p_party_size": "$6",
                "p_recurrence": "$7",
                "p_all_or_nothing": "$8",
            }
        ),
    }
)
# The key is the one the lookup above kept for this transaction.
_REMEMBER = fn.REMEMBER_FAILURE.statement(
    {
        "p_key": "current_setting('booking.request_key')::jsonb",
        "p_reason": "$1",
        "p_detail": "$2::jsonb",
    }
)
_SERIES = "SELECT * FROM appointment_series WHERE id = $1"
_APPOINTMENTS = (
    f"SELECT {_COLUMNS} FROM appointments a JOIN time_slots s ON s.id = a.time_slot_id"
    " WHERE a.series_id = $1 ORDER BY s.start_time, a.id"
)


def _series(row: asyncpg.Record, appointments: list[Appointment]) -> Series:
    by_id = {a.id: a for a in appointments}
    occurrences = []
    for o in json.loads(row["occurrences"]):
        appointment_id = o.get("appointment_id")
        detail = o.get("detail") or {}
        occurrences.append(
            Occurrence(
                start_time=_instant(o["start_time"]),
                slot_id=UUID(o["slot_id"]) if o.get("slot_id") else None,
                appointment=by_id.get(UUID(appointment_id)) if appointment_id else None,
                reason=o.get("reason"),
                detail={k: str(v) for k, v in detail.items() if v is not None},
            )
        )
    return Series(
        id=row["id"],
        user_id=row["user_id"],
        specialist_id=row["specialist_id"],
        recurrence=row["recurrence"],
        all_or_nothing=row["all_or_nothing"],
        held=row["held"],
        occurrences=occurrences,
    )


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def hold(
    db: Database,
    *,
    first_slot_id: UUID,
    rule: recurrence.Rule,
    recurrence_text: str,
    all_or_nothing: bool,
    user_id: UUID,
    priority: Priority,
    actor_id: UUID,
    hold_ttl: timedelta,
    check_user_overlap: bool,
    request_id: UUID | None,
    policy_exempt: bool,
    party_size: int,
    max_occurrences: int,
    max_days: int,
) -> Series:
    """Hold a slot for every occurrence, all or nothing or as many as
    possible, in one transaction; each occurrence is checked as HoldSlot
    checks it. Too many occurrences is SeriesTooLarge, too long a span
    SeriesTooLong."""
    sql = fn.HOLD_SERIES.sql

    async def hold_all(conn: Connection) -> asyncpg.Record | errors.BookingError:
        first = await conn.fetchrow(_FIRST_SLOT, first_slot_id)
        if first is None:
            # Refused before the function runs: a reason it could give,
            # stored under the request's key like one.
            refusal = SlotNotFound(id=str(first_slot_id))
            if request_id is not None:
                await conn.fetchval(_REMEMBER, refusal.reason, json.dumps(refusal.metadata()))
            return refusal
        starts = recurrence.expand(
            rule, first["start_time"], wallclock.zone(first["time_zone"]), max_occurrences
        )
        # A request the server refuses for its size is not an outcome of
        # the request: nothing is stored.
        if len(starts) > max_occurrences:
            raise SeriesTooLarge(
                occurrences=f"more than {max_occurrences}", max_occurrences=str(max_occurrences)
            )
        span = starts[-1] - starts[0]
        if span > timedelta(days=max_days):
            raise SeriesTooLong(days=str(span.days), max_days=str(max_days))
        args = fn.HOLD_SERIES.values(
            first_slot_id=first_slot_id,
            user_id=user_id,
            priority=priority.value,
            actor_id=actor_id,
            hold_ttl=hold_ttl,
            check_user_overlap=check_user_overlap,
            request_id=request_id,
            policy_exempt=policy_exempt,
            party_size=party_size,
            recurrence=recurrence_text,
            all_or_nothing=all_or_nothing,
            starts=starts,
        )
        return await requests.attempt(
            conn, lambda: conn.fetchrow(sql, *args), replayable=request_id is not None
        )

    async def work(conn: Connection) -> Series | errors.BookingError:
        if request_id is not None:
            key = await requests.attempt(
                conn,
                lambda: conn.fetchrow(
                    _OUTCOME,
                    actor_id,
                    request_id,
                    first_slot_id,
                    user_id,
                    priority.value,
                    party_size,
                    recurrence_text,
                    all_or_nothing,
                ),
                replayable=True,
            )
            if isinstance(key, errors.BookingError):
                return key
            if key is not None and key["result"] is not None:
                series_id = UUID(json.loads(key["result"])["series_id"])
                return await _read(conn, await conn.fetchrow(_SERIES, series_id))
        row = await hold_all(conn)
        if isinstance(row, errors.BookingError):
            return row
        return await _read(conn, row)

    outcome = await db.run(work, intent=Intent.WRITE)
    if isinstance(outcome, errors.BookingError):
        raise outcome
    return outcome


async def _read(conn: Connection, row: asyncpg.Record) -> Series:
    appointments = [_appointment(r) for r in await conn.fetch(_APPOINTMENTS, row["id"])]
    return _series(row, appointments)


async def _act(
    db: Database, function: fn.Function, series_id: UUID, **values: object
) -> list[Appointment]:
    sql = function.sql
    args = function.values(series_id=series_id, **values)
    replayable = values["request_id"] is not None

    async def work(conn: Connection) -> list[Appointment] | errors.BookingError:
        done = await requests.attempt(
            conn, lambda: conn.fetchval(sql, *args), replayable=replayable
        )
        if isinstance(done, errors.BookingError):
            return done
        return [_appointment(r) for r in await conn.fetch(_APPOINTMENTS, series_id)]

    outcome = await db.run(work, intent=Intent.WRITE)
    if isinstance(outcome, errors.BookingError):
        raise outcome
    return outcome


async def confirm(
    db: Database,
    series_id: UUID,
    *,
    owner_id: UUID | None,
    actor_id: UUID,
    request_id: UUID | None = None,
) -> list[Appointment]:
    """Confirm every occurrence in HOLD (all or none); the series'
    appointments. With a request id every copy gets the first copy's answer
    (its refusal too), and the series' appointments as they are."""
    return await _act(
        db,
        fn.CONFIRM_SERIES,
        series_id,
        owner_id=owner_id,
        actor_id=actor_id,
        request_id=request_id,
    )


async def cancel(
    db: Database,
    series_id: UUID,
    *,
    owner_id: UUID | None,
    actor_id: UUID,
    reason: str | None,
    policy_exempt: bool,
    request_id: UUID | None = None,
) -> list[Appointment]:
    """Cancel every live occurrence (all or none); the series' appointments.
    A request id as for :func:`confirm`."""
    return await _act(
        db,
        fn.CANCEL_SERIES,
        series_id,
        owner_id=owner_id,
        actor_id=actor_id,
        reason=reason,
        policy_exempt=policy_exempt,
        request_id=request_id,
    )
