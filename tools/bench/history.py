"""Two databases for the history scenario: one with only what the
measured calls need, and a copy of it with `rows` appointments and `rows`
events of past history behind them (docs/performance.md, "history").

Both get the same fixtures, so every measured call returns the same kind
of answer in both: the hold pool (db.seed), specialists with future slots
to list, reader users with two upcoming appointments each. The history
belongs to those same specialists and users (past slots, past
appointments, their events), plus many more users, so each index the hot
paths use holds the history too:

- each of the `specialists` has rows / specialists past half-hour slots,
  one appointment and one event each;
- the hold pool's users and more (one user per ten appointments) own them,
  so a user making a hold has about ten past appointments, as has each
  reader user.

The load is set-based (INSERT ... SELECT generate_series) in batches, with
the foreign-key triggers off for the loading session (the rows are
consistent by construction) and the secondary indexes and the exclusion
constraint dropped during the load and rebuilt after it, with the same
definitions: a rebuild sorts once where 10 million single inserts would
each descend the tree. Ids are deterministic (db.pool_uuid), so ascending.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from bench import db
from storage.slots import MAX_SLOT_LENGTH

HIST_SLOT = 0xB0000006
HIST_APPOINTMENT = 0xB0000007
HIST_EVENT = 0xB0000008
READ_USER = 0xB0000009
FIXTURE_APPOINTMENT = 0xB000000A
FIXTURE_EVENT = 0xB000000B

DAY_SLOTS = 24 * 60 // db.SLOT_MINUTES
FUTURE_DAYS = 7
PAGE = 50  # page size of the list calls, and how far behind the head a resume starts
BATCH = 1_000_000


@dataclass(frozen=True)
class Shape:
    """How the fixtures and the history are laid out (the same in both databases)."""

    rows: int
    pool: int  # users db.seed made (the hold pool)
    specialists: int
    readers: int
    users: int  # pool users plus the extra history users: one per ten appointments
    day0: int  # first future day (UTC midnight, epoch seconds)

    @property
    def future_slots(self) -> int:
        return self.specialists * DAY_SLOTS * FUTURE_DAYS

    def reads(self, resume_cursor: str) -> dict[str, object]:
        """What the load generator needs to name its reads (Job.reads)."""
        return {
            "specialists": self.specialists,
            "days": FUTURE_DAYS,
            "day0": self.day0,
            "readers": self.readers,
            "future_slots": self.future_slots,
            "resume_cursor": resume_cursor,
            "page_size": PAGE,
        }


def shape(rows: int, pool_size: int, day0: int) -> Shape:
    specialists = max(1, min(1000, rows // 1000))
    # Two upcoming appointments per reader, and at least a page of their
    # events so a resume a page behind the head reads a full page.
    readers = max(PAGE, min(1000, rows // 1000))
    return Shape(rows, pool_size, specialists, readers, max(pool_size, rows // 10), day0)


async def fixtures(url: str, s: Shape) -> None:
    """What both databases hold besides db.seed's pool."""
    spec = db.sql_uuid(db.READ_SPECIALIST, "g % $2")
    conn = await db.connect(url)
    try:
        await conn.execute(
            "INSERT INTO specialists (id, full_name, service_type)"
            f" SELECT {db.sql_uuid(db.READ_SPECIALIST, 's')}, 'History ' || s, 'bench-history'"
            " FROM generate_series(0, $1 - 1) s",
            s.specialists,
        )
        # Future slot g: specialist g % S, the (g / S)-th half hour from day0.
        await conn.execute(
            "INSERT INTO time_slots (id, specialist_id, start_time, end_time)"
            f" SELECT {db.sql_uuid(db.READ_SLOT, 'g')}, {spec},"
            "  to_timestamp($3) + (g / $2) * interval '30 minutes',"
            "  to_timestamp($3) + (g / $2 + 1) * interval '30 minutes'"
            " FROM generate_series(0, $1 - 1) g",
            s.future_slots,
            s.specialists,
            s.day0,
        )
        await conn.execute(
            "INSERT INTO users (id, email, password_hash, role)"
            f" SELECT {db.sql_uuid(READ_USER, 'r')}, 'bench-reader-' || r || '@bench.invalid',"
            " 'no-login', 'CLIENT' FROM generate_series(0, $1 - 1) r",
            s.readers,
        )
        # Reader r has confirmed appointments on future slots 2r and 2r + 1.
        await conn.execute(
            "INSERT INTO appointments (id, user_id, specialist_id, time_slot_id, status,"
            " created_at, updated_at)"
            f" SELECT {db.sql_uuid(FIXTURE_APPOINTMENT, 'g')}, {db.sql_uuid(READ_USER, 'g / 2')},"
            f"  t.specialist_id, t.id, 'CONFIRMED', now(), now()"
            " FROM generate_series(0, 2 * $1 - 1) g"
            f" JOIN time_slots t ON t.id = {db.sql_uuid(db.READ_SLOT, 'g')}",
            s.readers,
        )
        await conn.execute(
            "UPDATE time_slots SET status = 'BOOKED'"
            " WHERE id IN (SELECT time_slot_id FROM appointments)"
        )
        await conn.execute(
            "INSERT INTO appointment_events (id, appointment_id, event_type, old_status,"
            " new_status, time_slot_id, specialist_id, user_id, priority, start_time, end_time,"
            " appointment_created_at, created_at)"
            f" SELECT {db.sql_uuid(FIXTURE_EVENT, 'g')}, a.id, 'CONFIRMED', 'HOLD', 'CONFIRMED',"
            "  a.time_slot_id, a.specialist_id, a.user_id, a.priority, t.start_time, t.end_time,"
            "  a.created_at, a.created_at"
            " FROM generate_series(0, 2 * $1 - 1) g"
            f" JOIN appointments a ON a.id = {db.sql_uuid(FIXTURE_APPOINTMENT, 'g')}"
            " JOIN time_slots t ON t.id = a.time_slot_id ORDER BY g",
            s.readers,
        )
        await conn.execute("VACUUM (ANALYZE)")
    finally:
        await conn.close()


# Indexes rebuilt after the load rather than maintained row by row.
_SECONDARY = (
    "SELECT c.relname AS name, pg_get_indexdef(i.indexrelid) AS def"
    " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
    " WHERE i.indrelid = $1::regclass"
    "  AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)"
)
_EXCLUSIONS = (
    "SELECT conname AS name, pg_get_constraintdef(oid) AS def FROM pg_constraint"
    " WHERE conrelid = $1::regclass AND contype = 'x'"
)
_TABLES = ("time_slots", "appointments", "appointment_events", "users")


async def load(
    url: str, s: Shape, on_progress: Callable[[str], None], *, slot_times: bool = True
) -> float:
    """Add the history to the database at `url`; returns the seconds it took.
    The appointments get their slot's times (appointments.slot_start/slot_end,
    what the trigger sets), unless `slot_times` is false: then they look
    written before those columns existed, for `migrate backfill` to set."""
    started = time.monotonic()
    conn = await db.connect(url)
    try:
        await conn.execute("SET synchronous_commit = off")
        await conn.execute("SET maintenance_work_mem = '256MB'")
        superuser = bool(
            await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        )
        if superuser:
            # Foreign keys hold by construction; their per-row triggers would
            # double the load time.
            await conn.execute("SET session_replication_role = replica")
        rebuild: list[str] = []
        for table in _TABLES:
            for r in await conn.fetch(_EXCLUSIONS, table):
                await conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{r["name"]}"')
                rebuild.append(f'ALTER TABLE {table} ADD CONSTRAINT "{r["name"]}" {r["def"]}')
            for r in await conn.fetch(_SECONDARY, table):
                await conn.execute(f'DROP INDEX "{r["name"]}"')
                rebuild.append(r["def"])
        # Constants go into the text (integers of our own); $1, $2 bound the batch.
        spec = db.sql_uuid(db.READ_SPECIALIST, f"g % {s.specialists}")
        # Past slot g: specialist g % S, the (g / S + 1)-th half hour before today.
        start = (
            f"(to_timestamp({s.day0}) - interval '1 day'"
            f" - (g / {s.specialists} + 1) * interval '30 minutes')"
        )
        user = (
            f"CASE WHEN g % 1000 = 0 THEN {db.sql_uuid(READ_USER, f'(g / 1000) % {s.readers}')}"
            f" ELSE {db.sql_uuid(db.POOL_USER, f'g % {s.users}')} END"
        )
        status = (
            "(CASE WHEN g % 10 < 7 THEN 'CONFIRMED' WHEN g % 10 < 9 THEN 'CANCELLED'"
            " ELSE 'NO_SHOW' END)::appointment_status"
        )
        series = "FROM generate_series($1::bigint, $2::bigint - 1) g"
        if s.users > s.pool:
            on_progress(f"  history: {s.users - s.pool:,} more users")
            await conn.execute(
                "INSERT INTO users (id, email, password_hash, role, created_at)"
                f" SELECT {db.sql_uuid(db.POOL_USER, 'g')},"
                " 'bench-client-' || g || '@bench.invalid', 'no-login', 'CLIENT',"
                f" now() - interval '400 days' {series}",
                s.pool,
                s.users,
            )
        for low in range(0, s.rows, BATCH):
            high = min(s.rows, low + BATCH)
            on_progress(f"  history: rows {low:,}-{high:,} of {s.rows:,}")
            await conn.execute(
                "INSERT INTO time_slots (id, specialist_id, start_time, end_time, status,"
                " created_at)"
                f" SELECT {db.sql_uuid(HIST_SLOT, 'g')}, {spec}, {start},"
                f"  {start} + interval '30 minutes',"
                "  (CASE WHEN g % 10 IN (7, 8) THEN 'AVAILABLE' ELSE 'BOOKED' END)"
                f"::timeslot_status, {start} - interval '30 days' {series}",
                low,
                high,
            )
            times = (", slot_start, slot_end", f", {start}, {start} + interval '30 minutes'")
            await conn.execute(
                "INSERT INTO appointments (id, user_id, specialist_id, time_slot_id, status,"
                f" created_at, updated_at{times[0] if slot_times else ''})"
                f" SELECT {db.sql_uuid(HIST_APPOINTMENT, 'g')}, {user}, {spec},"
                f"  {db.sql_uuid(HIST_SLOT, 'g')}, {status},"
                f"  {start} - interval '3 days', {start}{times[1] if slot_times else ''} {series}",
                low,
                high,
            )
            await conn.execute(
                "INSERT INTO appointment_events (id, appointment_id, event_type, old_status,"
                " new_status, time_slot_id, specialist_id, user_id, priority, start_time,"
                " end_time, appointment_created_at, actor_id, created_at)"
                f" SELECT {db.sql_uuid(HIST_EVENT, 'g')}, {db.sql_uuid(HIST_APPOINTMENT, 'g')},"
                f"  ({status})::text, (CASE WHEN g % 10 < 7 THEN 'HOLD' ELSE 'CONFIRMED' END)"
                f"::appointment_status, {status}, {db.sql_uuid(HIST_SLOT, 'g')}, {spec}, {user},"
                f"  'NORMAL', {start}, {start} + interval '30 minutes',"
                f"  {start} - interval '3 days', {user}, {start} {series} ORDER BY g",
                low,
                high,
            )
        on_progress(f"  history: rebuilding {len(rebuild)} indexes and constraints")
        for statement in rebuild:
            await conn.execute(statement)
        await conn.execute("RESET session_replication_role")
        on_progress("  history: VACUUM (FREEZE, ANALYZE)")
        await conn.execute("VACUUM (FREEZE, ANALYZE)")
        if superuser:
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return time.monotonic() - started


async def resume_cursor(url: str) -> str:
    """The cursor of the event a page behind the newest: a resume from it
    reads one full page of existing events."""
    conn = await db.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT xid::text AS xid, seq FROM appointment_events"
            " ORDER BY xid DESC, seq DESC OFFSET $1 LIMIT 1",
            PAGE,
        )
    finally:
        await conn.close()
    return "" if row is None else f"{row['xid']}-{row['seq']}"


async def mark(url: str) -> float:
    """The database's clock now: what reset() keeps is older than this."""
    conn = await db.connect(url)
    try:
        return float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())"))
    finally:
        await conn.close()


async def reset(url: str, since: float) -> None:
    """Undo the measured holds, keeping the fixtures and the history.
    Run while no server works on the database."""
    conn = await db.connect(url)
    try:
        await conn.execute("SET default_transaction_isolation = 'read committed'")
        await conn.execute("DELETE FROM idempotency_keys")
        await conn.execute(
            "DELETE FROM appointment_events WHERE created_at >= to_timestamp($1)", since
        )
        await conn.execute("DELETE FROM appointments WHERE created_at >= to_timestamp($1)", since)
        await conn.execute(
            "UPDATE time_slots SET status = 'AVAILABLE' WHERE specialist_id = $1"
            " AND status <> 'AVAILABLE'",
            db.pool_uuid(db.POOL_SPECIALIST, 0),
        )
        await conn.execute("VACUUM (ANALYZE) time_slots, appointments, appointment_events")
    finally:
        await conn.close()


async def vacuum_analyze(url: str) -> None:
    """After the backfill: the history as loaded is frozen and analyzed."""
    conn = await db.connect(url)
    try:
        await conn.execute("VACUUM (FREEZE, ANALYZE) appointments")
    finally:
        await conn.close()


@dataclass(frozen=True)
class Plan:
    """EXPLAIN (ANALYZE, BUFFERS) of one read, as the service runs it."""

    name: str
    sql: str
    plan: str


def read_statements(
    *,
    slot: object,
    specialist: object,
    day: datetime,
    reader: object,
    day0: datetime,
    resume: tuple[int, int],
) -> dict[str, tuple[str, list[object]]]:
    """The reads' statements as storage/ builds them for these calls (kept
    in step by hand: storage/slots.py, storage/appointments.py,
    storage/events.py), with their arguments."""
    appointment_cols = (
        "a.id, a.user_id, a.specialist_id, a.time_slot_id, a.status, a.priority,"
        " s.start_time, s.end_time, a.expires_at, a.created_at, a.updated_at"
    )
    events = (
        "WITH h AS (SELECT x, EXISTS (SELECT 1 FROM appointment_events p WHERE p.xid >= x)"
        " AS pending FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS x) s)"
        " SELECT h.pending, head.xid AS head_xid, head.seq AS head_seq,"
        " c.pruned_xid::text::bigint AS pruned_xid, c.pruned_seq, ev.*"
        " FROM h LEFT JOIN booking_event_horizon c ON true"
        " LEFT JOIN LATERAL (SELECT t.xid::text::bigint AS xid, t.seq FROM appointment_events t"
        " WHERE t.xid < h.x ORDER BY t.xid DESC, t.seq DESC LIMIT 1) head ON true"
        " LEFT JOIN LATERAL ("
        "  SELECT e.* FROM appointment_events e"
        "  WHERE e.xid < h.x"
        "   AND (c.pruned_xid IS NULL OR (e.xid, e.seq) > (c.pruned_xid, c.pruned_seq))"
        "   AND (e.xid, e.seq) > ($1::text::xid8, $2::bigint){user}"
        "  ORDER BY e.xid, e.seq LIMIT {limit}"
        " ) ev ON true ORDER BY ev.xid, ev.seq"
    )
    return {
        "GetSlot": (
            "SELECT id, specialist_id, start_time, end_time, status, created_at FROM time_slots"
            " WHERE id = $1 AND deleted_at IS NULL",
            [slot],
        ),
        "ListSlots (a day)": (
            "SELECT id, specialist_id, start_time, end_time, status, created_at FROM time_slots"
            " WHERE deleted_at IS NULL AND specialist_id = $1 AND end_time > $2"
            " AND start_time >= $3 AND start_time < $4 ORDER BY start_time, id LIMIT $5",
            [specialist, day, day - MAX_SLOT_LENGTH, day + timedelta(days=1), PAGE + 1],
        ),
        "ListAppointments (a user's upcoming)": (
            f"SELECT {appointment_cols} FROM appointments a"
            " JOIN time_slots s ON s.id = a.time_slot_id WHERE a.slot_end > $2 AND a.user_id = $1"
            f" UNION ALL SELECT {appointment_cols} FROM appointments a"
            " JOIN time_slots s ON s.id = a.time_slot_id"
            " WHERE a.slot_end IS NULL AND s.end_time > $2 AND a.user_id = $1"
            " ORDER BY start_time, id LIMIT $3",
            [reader, day0, PAGE + 1],
        ),
        "ListAppointmentEvents (resume)": (
            events.format(user="", limit="$3"),
            [str(resume[0]), resume[1], PAGE],
        ),
        "ListAppointmentEvents (a user's, from the start)": (
            events.format(user=" AND e.user_id = $3", limit="$4"),
            ["0", 0, reader, 2],
        ),
    }


async def explain(url: str, statements: dict[str, tuple[str, list[object]]]) -> list[Plan]:
    out = []
    conn = await db.connect(url)
    try:
        for name, (sql, args) in statements.items():
            rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}", *args)
            out.append(Plan(name, sql, "\n".join(str(r[0]) for r in rows)))
    finally:
        await conn.close()
    return out
