"""Backfills that run under live traffic, in short batches.

`slot_times`: the slot's start and end copied onto appointments written
before those columns existed (migration 0044). Each batch is one short
READ COMMITTED transaction over the next `batch_size` appointments in
primary-key order, so no lock is held for long and the total work is one
pass over the table. New and rescheduled appointments get the columns from
the trigger that sets them (storage/sql/buffers.sql); a row a transition
changes while its batch runs is re-checked by PostgreSQL after the
transition commits, and skipped if the trigger has set it meanwhile. A
slot's times never change, so a copy stays right once made. The reads
that use the columns also read the rows still NULL the old way, so they
are correct before, during and after the backfill."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

from asyncpg import Connection

from storage.database import Database, Intent, Isolation

_SLOT_TIMES_BATCH = """
WITH batch AS (
    SELECT id FROM appointments
    WHERE $1::uuid IS NULL OR id > $1
    ORDER BY id LIMIT $2
), done AS (
    UPDATE appointments a SET slot_start = s.start_time, slot_end = s.end_time
    FROM batch b, time_slots s
    WHERE a.id = b.id AND a.slot_end IS NULL AND s.id = a.time_slot_id
    RETURNING 1
)
SELECT (SELECT id FROM batch ORDER BY id DESC LIMIT 1) AS last,
       (SELECT count(*) FROM done) AS updated
"""

_SLOT_TIMES_LEFT = "SELECT count(*) FROM appointments WHERE slot_end IS NULL"


@dataclass(frozen=True)
class Progress:
    batches: int
    scanned_to: UUID | None
    updated: int


async def slot_times(
    db: Database,
    *,
    batch_size: int = 5000,
    on_batch: Callable[[Progress], None] | None = None,
) -> Progress:
    """Set appointments.slot_start/slot_end wherever they are NULL; returns
    the totals. Safe to stop and run again: it starts over and skips rows
    already set."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    after: UUID | None = None
    batches = updated = 0
    while True:

        async def work(conn: Connection, cursor: UUID | None = after) -> tuple[UUID | None, int]:
            row = await conn.fetchrow(_SLOT_TIMES_BATCH, cursor, batch_size)
            assert row is not None
            return row["last"], int(row["updated"])

        last, count = await db.run(work, intent=Intent.WRITE, isolation=Isolation.READ_COMMITTED)
        if last is None:
            # The planner's statistics of the columns, now they are set.
            await db.execute("ANALYZE appointments", intent=Intent.WRITE)
            return Progress(batches, after, updated)
        batches += 1
        updated += count
        after = last
        if on_batch is not None:
            on_batch(Progress(batches, after, updated))


async def slot_times_left(db: Database) -> int:
    """How many appointments still lack their slot's times."""
    return int(await db.fetchval(_SLOT_TIMES_LEFT, intent=Intent.READ))
