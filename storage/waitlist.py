"""SQL for the waitlist (storage/sql/waitlist.sql; docs/waitlist.md).

Entries change state through the functions there; offers are made by the
database itself whenever a slot is freed or created, so nothing here makes
one."""

from __future__ import annotations

from datetime import datetime, timedelta
from uuid import UUID

import asyncpg

from storage import functions as fn
from storage import requests
from storage.conditions import Conditions
from storage.database import Database, Intent
from storage.errors import WaitlistEntryNotFound
from storage.models import Page, Priority, WaitlistEntry, WaitlistStatus

_COLUMNS = (
    "id, user_id, specialist_id, service_type, window_start, window_end, priority, status,"
    " appointment_id, created_at, updated_at, party_size"
)


def _entry(row: asyncpg.Record) -> WaitlistEntry:
    return WaitlistEntry(
        id=row["id"],
        user_id=row["user_id"],
        specialist_id=row["specialist_id"],
        service_type=row["service_type"],
        window_start=row["window_start"],
        window_end=row["window_end"],
        priority=Priority(row["priority"]),
        status=WaitlistStatus(row["status"]),
        appointment_id=row["appointment_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        party_size=row["party_size"],
    )


async def _call(db: Database, function: fn.Function, **values: object) -> WaitlistEntry:
    """Run a waitlist function; with a request id, every copy of the request
    gets one answer (storage/requests.py)."""
    return _entry(
        await requests.call(
            db,
            function.sql,
            function.values(**values),
            replayable=values.get("request_id") is not None,
        )
    )


async def create(
    db: Database,
    *,
    user_id: UUID,
    specialist_id: UUID | None,
    service_type: str | None,
    window_start: datetime,
    window_end: datetime,
    priority: Priority,
    offer_ttl: timedelta,
    actor_id: UUID,
    request_id: UUID | None,
    party_size: int = 1,
) -> WaitlistEntry:
    """Join the waitlist; an offer holds `party_size` seats, all or none."""
    return await _call(
        db,
        fn.CREATE_WAITLIST_ENTRY,
        user_id=user_id,
        specialist_id=specialist_id,
        service_type=service_type,
        window_start=window_start,
        window_end=window_end,
        priority=priority.value,
        offer_ttl=offer_ttl,
        actor_id=actor_id,
        request_id=request_id,
        party_size=party_size,
    )


async def cancel(db: Database, entry_id: UUID, *, owner_id: UUID | None) -> WaitlistEntry:
    """ACTIVE -> CANCELLED. `owner_id` restricts it to one user's entries."""
    return await _call(db, fn.CANCEL_WAITLIST_ENTRY, id=entry_id, owner_id=owner_id)


async def expire(db: Database, limit: int) -> int:
    """Mark up to `limit` ACTIVE entries whose window has ended EXPIRED;
    returns how many."""
    sql = fn.EXPIRE_WAITLIST_ENTRIES.statement()

    return int(await db.fetchval(sql, limit, intent=Intent.WRITE))


async def get(db: Database, entry_id: UUID, *, owner_id: UUID | None = None) -> WaitlistEntry:
    """Another user's entry, for an `owner_id`, is reported as missing."""
    row = await db.fetchrow(
        f"SELECT {_COLUMNS} FROM waitlist_entries"
        " WHERE id = $1 AND ($2::uuid IS NULL OR user_id = $2)",
        entry_id,
        owner_id,
        intent=Intent.READ,
    )
    if row is None:
        raise WaitlistEntryNotFound(id=str(entry_id))
    return _entry(row)


async def list_(
    db: Database,
    *,
    user_id: UUID | None,
    specialist_id: UUID | None,
    service_type: str | None,
    status: WaitlistStatus | None,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> Page[WaitlistEntry]:
    """Oldest first, by (created_at, id)."""
    where = Conditions()
    where.add_if(user_id, "user_id = {}")
    where.add_if(specialist_id, "specialist_id = {}")
    where.add_if(service_type, "service_type = {}")
    where.add_if(status.value if status else None, "status = {}::waitlist_entry_status")
    if after is not None:
        where.add("(created_at, id) > ({}, {})", after[0], after[1])
    sql = (
        f"SELECT {_COLUMNS} FROM waitlist_entries{where.sql(' WHERE ')}"
        f" ORDER BY created_at, id LIMIT {where.arg(limit + 1)}"
    )
    rows = await db.fetch(sql, *where.args, intent=Intent.READ)
    return Page([_entry(r) for r in rows[:limit]], has_more=len(rows) > limit)
