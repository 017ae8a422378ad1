"""SQL for time slots."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg

from storage import functions as fn
from storage.conditions import Conditions
from storage.database import Connection, Database, Intent, stamped
from storage.errors import SlotNotFound, SpecialistInactive, SpecialistNotFound
from storage.models import AvailableSlot, Page, Slot, SlotStatus

# The longest a slot may last (the CHECK time_slots_length_bounded): long
# enough for any day's opening hours, a day of 25 hours included.
MAX_SLOT_LENGTH = timedelta(hours=48)
_EARLIEST = datetime.min.replace(tzinfo=UTC)

_COLUMNS = (
    "id, specialist_id, start_time, end_time, status, created_at, capacity,"
    " capacity - seats_taken AS seats_available"
)
_INSERT_SLOTS = f"SELECT {_COLUMNS} FROM " + fn.INSERT_SLOTS.call(
    {
        "p_specialist_ids": "$1::uuid[]",
        "p_start_times": "$2::timestamptz[]",
        "p_end_times": "$3::timestamptz[]",
        "p_capacities": "$4::integer[]",
    }
)
_SET_CAPACITY = f"SELECT {_COLUMNS} FROM " + fn.SET_SLOT_CAPACITY.call(
    {"p_slot_id": "$1", "p_capacity": "$2"}
)

# By value, without the Enum call's machinery: this runs for every row read.
_STATUS = {s.value: s for s in SlotStatus}


@dataclass(frozen=True)
class NewSlot:
    specialist_id: UUID
    start_time: datetime
    end_time: datetime
    capacity: int = 1


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


async def lock_specialists(
    conn: Connection, specialist_ids: Sequence[UUID], *, exclusive: bool = False
) -> dict[UUID, asyncpg.Record]:
    """Lock the specialists slots are about to be added to, and check each
    exists and is active. FOR SHARE (concurrent batches proceed) keeps a
    specialist from being deactivated mid-way; ``exclusive`` (FOR NO KEY
    UPDATE, for materialising a schedule) also waits out, and then holds
    off, every other insertion of slots for them."""
    ids = sorted(set(specialist_ids))
    mode = "FOR NO KEY UPDATE" if exclusive else "FOR SHARE"
    found = await conn.fetch(
        "SELECT id, is_active, time_zone, now() AS now FROM specialists"
        f" WHERE id = ANY($1::uuid[]) ORDER BY id {mode}",
        ids,
    )
    rows = {r["id"]: r for r in found}
    for sid in ids:
        if sid not in rows:
            raise SpecialistNotFound(id=str(sid))
        if not rows[sid]["is_active"]:
            raise SpecialistInactive(specialist_id=str(sid))
    return rows


async def insert_slots(conn: Connection, new: Sequence[NewSlot]) -> list[Slot]:
    """Insert slots inside the caller's transaction, after lock_specialists:
    the one way to create slots (CreateSlot, BatchCreateSlots and schedule
    materialisation, storage/schedules.py, all come here). Each new slot is
    offered to the waitlist in the same transaction (booking_slot_created,
    storage/sql/waitlist.sql), so it comes back HOLD when a waiter got it.
    In the order given; an overlap raises the exclusion violation
    (SlotOverlap once Database.run translates it)."""
    rows = await conn.fetch(
        _INSERT_SLOTS,
        *fn.INSERT_SLOTS.values(
            specialist_ids=[s.specialist_id for s in new],
            start_times=[s.start_time for s in new],
            end_times=[s.end_time for s in new],
            capacities=[s.capacity for s in new],
        ),
    )
    return [_slot(r) for r in rows]


async def create_many(db: Database, new: list[NewSlot]) -> list[Slot]:
    """Create all the slots or none."""

    async def work(conn: Connection) -> list[Slot]:
        await lock_specialists(conn, [s.specialist_id for s in new])
        return await insert_slots(conn, new)

    return await db.run(work, intent=Intent.WRITE)


async def get(db: Database, slot_id: UUID) -> Slot:
    row = await db.fetchrow(
        f"SELECT {_COLUMNS} FROM time_slots WHERE id = $1 AND deleted_at IS NULL",
        slot_id,
        intent=Intent.READ,
    )
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
    # No slot lasts longer (time_slots_length_bounded): a bound the index
    # range can start at, instead of the specialist's first slot.
    # (Within 48 hours of 0001-01-01 there is no bound to take.)
    if window_start is not None and window_start - _EARLIEST >= MAX_SLOT_LENGTH:
        where.add("start_time >= {}", window_start - MAX_SLOT_LENGTH)
    where.add_if(window_end, "start_time < {}")
    where.add_if(status.value if status else None, "status = {}::timeslot_status")
    if after is not None:
        where.add("(start_time, id) > ({}, {})", after[0], after[1])
    sql = (
        f"SELECT {_COLUMNS} FROM time_slots WHERE deleted_at IS NULL{where.sql()}"
        f" ORDER BY start_time, id LIMIT {where.arg(limit + 1)}"
    )
    rows = await db.fetch(sql, *where.args, intent=Intent.READ)
    return Page([_slot(r) for r in rows[:limit]], has_more=len(rows) > limit)


async def set_capacity(db: Database, slot_id: UUID, capacity: int) -> Slot:
    """Raise or lower a slot's capacity, never below the seats taken
    (CapacityBelowSeatsTaken); added seats go to the waitlist first."""

    async def work(conn: Connection) -> asyncpg.Record:
        statement, values = stamped(_SET_CAPACITY, [slot_id, capacity])
        return await conn.fetchrow(statement, *values)

    return _slot(await db.run(work, intent=Intent.WRITE, single_statement=True))


async def delete(db: Database, slot_id: UUID) -> None:
    """Delete a slot nobody occupies (storage/sql/slots.sql). It is kept,
    marked deleted, because past appointments and events may reference it;
    it no longer blocks overlaps."""
    sql = fn.DELETE_SLOT.statement()
    await db.execute(sql, *fn.DELETE_SLOT.values(slot_id=slot_id), intent=Intent.WRITE)


# Free as HoldSlot sees it (storage/sql/waitlist.sql, booking_slot_is_free):
# AVAILABLE, or held by a lapsed hold no waiter would be offered. The status
# test first, so the function runs only for the rare held-or-lapsed slot.
_FREE = "s.status <> 'BOOKED' AND (s.status = 'AVAILABLE' OR booking_slot_is_free(s))"
_SEARCH_COLUMNS = (
    "s.id, s.specialist_id, s.start_time, s.end_time, s.created_at, p.full_name, p.service_type,"
    " s.capacity, s.seats_taken"
)


async def search_available(
    db: Database,
    *,
    service_type: str | None,
    specialist_ids: list[UUID] | None,
    window_start: datetime,
    window_end: datetime,
    client_id: UUID | None,
    after: tuple[datetime, UUID] | None,
    limit: int,
    party_size: int = 1,
) -> Page[AvailableSlot]:
    """Free slots of active specialists (of `service_type`, or among
    `specialist_ids`) that start in [window_start, window_end), earliest
    first across all of them. `client_id` is the CLIENT asking, if one is:
    only slots it may hold are shown (booking_may_hold, the policies'
    place). docs/api.md shows the plans. With `party_size` more than 1, only
    slots with that many seats free, or free once their lapsed holds are
    reclaimed, as HoldSlot would make room for them (seats.sql,
    booking_claim_seats)."""
    where = Conditions()
    where.add("s.start_time >= {}", window_start)
    where.add("s.start_time < {}", window_end)
    if after is not None:
        where.add("(s.start_time, s.id) > ({}, {})", after[0], after[1])
    if party_size > 1:
        # The lapsed holds are summed only for a slot without room as it is.
        where.add(
            "(s.capacity - s.seats_taken >= {0} OR (s.seats_held > 0"
            " AND s.capacity - s.seats_taken + (SELECT coalesce(sum(a.party_size), 0)"
            "  FROM appointments a WHERE a.time_slot_id = s.id AND a.status = 'HOLD'"
            "  AND a.expires_at <= now()) >= {0}))",
            party_size,
        )
    # A slot a buffer blocks is not free (storage/sql/buffers.sql).
    where.add("NOT booking_slot_buffer_blocked(s)")
    if client_id is not None:
        where.add("booking_may_hold({}, s)", client_id)
        # Nor one overlapping the CLIENT's own live appointments: HoldSlot
        # would refuse it USER_OVERLAP.
        where.add("NOT booking_user_overlaps({}, s)", client_id)
    if specialist_ids is not None:
        # Each specialist's own index range, merged: a few specialists'
        # week never reads anyone else's slots.
        ids = where.arg(specialist_ids)
        sql = (
            f"SELECT {_SEARCH_COLUMNS} FROM specialists p"
            " CROSS JOIN LATERAL ("
            "  SELECT s.* FROM time_slots s"
            f"  WHERE s.specialist_id = p.id AND s.deleted_at IS NULL AND {_FREE}{where.sql()}"
            f"  ORDER BY s.start_time, s.id LIMIT {where.arg(limit + 1)}"
            " ) s"
            f" WHERE p.id = ANY({ids}::uuid[]) AND p.is_active"
            f" ORDER BY s.start_time, s.id LIMIT {where.arg(limit + 1)}"
        )
    else:
        # The start-time index in order, keeping the slots of the type's
        # active specialists: a page reads about page / (the type's share of
        # the window's slots) index entries.
        sql = (
            f"SELECT {_SEARCH_COLUMNS} FROM time_slots s"
            " JOIN specialists p ON p.id = s.specialist_id"
            f" WHERE p.service_type = {where.arg(service_type)} AND p.is_active"
            f" AND s.deleted_at IS NULL AND {_FREE}{where.sql()}"
            f" ORDER BY s.start_time, s.id LIMIT {where.arg(limit + 1)}"
        )
    rows = await db.fetch(sql, *where.args, intent=Intent.READ)
    items = [
        AvailableSlot(
            slot=Slot(
                id=r["id"],
                specialist_id=r["specialist_id"],
                start_time=r["start_time"],
                end_time=r["end_time"],
                # A lapsed hold is free: reported as it will be once reclaimed.
                status=SlotStatus.AVAILABLE,
                created_at=r["created_at"],
                capacity=r["capacity"],
                # Lapsed holds count as taken until reclaimed: at least one
                # seat is free to HoldSlot.
                seats_available=max(party_size, r["capacity"] - r["seats_taken"]),
            ),
            specialist_name=r["full_name"],
            service_type=r["service_type"],
        )
        for r in rows[:limit]
    ]
    return Page(items, has_more=len(rows) > limit)
