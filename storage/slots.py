"""SQL for time slots."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID, uuid4

import asyncpg

from storage import transitions as fn
from storage.database import Connection, Database
from storage.errors import SlotNotFound, SpecialistInactive, SpecialistNotFound
from storage.models import Page, Slot, SlotStatus
from storage.sql import Conditions

_COLUMNS = "id, specialist_id, start_time, end_time, status, created_at"

# By value, without the Enum call's machinery: this runs for every row read.
_STATUS = {s.value: s for s in SlotStatus}


@dataclass(frozen=True)
class NewSlot:
    specialist_id: UUID
    start_time: datetime
    end_time: datetime


_new = object.__new__


def _slot(row: asyncpg.Record) -> Slot:
    # The row's columns are the record's fields (_COLUMNS): filled in one
    # step, not through the frozen dataclass's __init__, which sets each
    # field with object.__setattr__; a day's listing builds dozens of these.
    slot: Slot = _new(Slot)
    fields = slot.__dict__
    fields.update(row.items())
    fields["status"] = _STATUS[row["status"]]
    return slot


async def create_many(db: Database, new: list[NewSlot]) -> list[Slot]:
    """Create all the slots or none. Overlaps (with each other or with
    existing slots) are refused by the exclusion constraint."""
    specialist_ids = sorted({s.specialist_id for s in new})

    async def work(conn: Connection) -> list[asyncpg.Record]:
        # FOR SHARE keeps a specialist from being deactivated mid-way.
        found = await conn.fetch(
            "SELECT id, is_active FROM specialists WHERE id = ANY($1::uuid[])"
            " ORDER BY id FOR SHARE",
            specialist_ids,
        )
        active = {r["id"]: r["is_active"] for r in found}
        for sid in specialist_ids:
            if sid not in active:
                raise SpecialistNotFound(id=str(sid))
            if not active[sid]:
                raise SpecialistInactive(specialist_id=str(sid))
        rows: list[asyncpg.Record] = await conn.fetch(
            "INSERT INTO time_slots (id, specialist_id, start_time, end_time)"
            " SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::timestamptz[])"
            f" RETURNING {_COLUMNS}",
            [uuid4() for _ in new],
            [s.specialist_id for s in new],
            [s.start_time for s in new],
            [s.end_time for s in new],
        )
        return rows

    rows = await db.run(work)
    return [_slot(r) for r in rows]


async def get(db: Database, slot_id: UUID) -> Slot:
    async def work(conn: Connection) -> asyncpg.Record | None:
        return await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM time_slots WHERE id = $1 AND deleted_at IS NULL", slot_id
        )

    row = await db.run(work, single_statement=True, read_only=True)
    if row is None:
        raise SlotNotFound(id=str(slot_id))
    return _slot(row)


async def list_(
    db: Database,
    *,
    specialist_id: UUID | None,
    window_start: datetime | None,
    window_end: datetime | None,
    status: SlotStatus | None,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> Page[Slot]:
    where = Conditions()
    where.add_if(specialist_id, "specialist_id = {}")
    # Plain comparisons: with the (specialist_id, start_time, end_time) btree
    # this reads a handful of pages for one specialist's day among 1M slots,
    # where the overlap operator on the GiST index read hundreds.
    where.add_if(window_start, "end_time > {}")
    where.add_if(window_end, "start_time < {}")
    where.add_if(status.value if status else None, "status = {}::timeslot_status")
    if after is not None:
        where.add("(start_time, id) > ({}, {})", after[0], after[1])
    sql = (
        f"SELECT {_COLUMNS} FROM time_slots WHERE deleted_at IS NULL{where.sql()}"
        f" ORDER BY start_time, id LIMIT {where.arg(limit + 1)}"
    )

    async def work(conn: Connection) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *where.args)
        return rows

    rows = await db.run(work, single_statement=True, read_only=True)
    return Page([_slot(r) for r in rows[:limit]], has_more=len(rows) > limit)


async def delete(db: Database, slot_id: UUID) -> None:
    """Delete a slot nobody occupies (storage/sql/slots.sql). It is kept,
    marked deleted, because past appointments and events may reference it;
    it no longer blocks overlaps."""
    sql = fn.DELETE_SLOT.statement()

    async def work(conn: Connection) -> None:
        await conn.execute(sql, *fn.DELETE_SLOT.values(slot_id=slot_id))

    await db.run(work, single_statement=True)
