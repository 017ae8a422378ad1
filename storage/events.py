"""SQL for the appointment event log.

Readers only see events below the oldest transaction still running
(``pg_snapshot_xmin``), ordered by (xid, seq). An event whose transaction
commits late therefore cannot be skipped: readers wait for it instead.
Every position handed out is that of a committed event (or the start), so
crash recovery reusing xids cannot slip an event in below it.
docs/events.md has the reasoning.
"""

from __future__ import annotations

import asyncpg

from storage.conditions import Conditions
from storage.database import Connection, Database, Intent, stamped
from storage.errors import CursorCompacted, CursorNotInHistory, DatabaseUnavailable
from storage.models import (
    Appointment,
    AppointmentEvent,
    AppointmentStatus,
    EventFilter,
    EventType,
    Position,
    Priority,
)

EVENT_COLUMNS = (
    "e.id, e.xid::text::bigint AS xid, e.seq, e.appointment_id, e.event_type, e.old_status,"
    " e.new_status, e.time_slot_id, e.previous_slot_id, e.specialist_id, e.user_id,"
    " e.priority, e.start_time, e.end_time, e.expires_at, e.appointment_created_at,"
    " e.actor_id, e.reason, e.created_at"
)

# A HELD event is a waitlist offer when its appointment is an entry's offer
# (storage/sql/waitlist.sql). Derived on reading, not stored on the event:
# docs/schema.md says why. Joined to the page of events already chosen, so
# it costs one index probe per event returned. Transitions return no
# offers, so their events are read without it.
_WAITLIST_JOIN = (
    " LEFT JOIN waitlist_entries w"
    " ON ev.event_type = 'HELD' AND w.appointment_id = ev.appointment_id"
)

# An event's party size and series are its appointment's (they never
# change), not stored on the event (docs/seats.md): one primary-key probe
# per event returned.
_APPOINTMENT_JOIN = " LEFT JOIN appointments ap ON ap.id = ev.appointment_id"

# The stable horizon: every transaction with a smaller xid has finished.
_HORIZON = "pg_snapshot_xmin(pg_current_snapshot())"

# The newest event below the horizon `h.x`, as a LATERAL subquery so the
# horizon is an index condition: one backward step of the (xid, seq) index.
# Positions handed out are always such event positions, never the horizon
# itself (docs/events.md, "Crash recovery").
_STABLE_HEAD = (
    "SELECT t.xid::text::bigint AS xid, t.seq FROM appointment_events t"
    " WHERE t.xid < h.x ORDER BY t.xid DESC, t.seq DESC LIMIT 1"
)


# The durability gate (storage/durability.py): after the read, a barrier on
# the primary (`_gate_after`): its commit waits until everything committed
# before it, so every commit the read's snapshot saw, is on the synchronous
# standbys; until it returns nothing read is delivered, so no event read here
# can be lost by a failover. The barrier is a statement of its own, not part
# of the read, so that its logical message and its commit record are written
# microseconds apart: a node frozen in between and replaced in its absence
# would write that commit record when it resumes, and a read takes far
# longer than the barrier's own statement. It is stamped with the call's
# time bound, as a write is (docs/cluster.md, "A resumed old primary").
# On a hot standby the read reports what the standby has replayed
# (`replayed`, `replayed_tli`), and the gate checks that the primary's
# barrier came at or after it (docs/events.md, "Reading from a standby").
_RECOVERY = "(SELECT pg_is_in_recovery() AS standby) r"
_GATE = (
    "r.standby, current_setting('synchronous_standby_names') <> '' AS synchronous,"
    " CASE WHEN r.standby THEN pg_last_wal_replay_lsn()::text END AS replayed,"
    " CASE WHEN r.standby THEN (SELECT w.received_tli FROM pg_stat_wal_receiver w"
    "  WHERE w.status = 'streaming') END AS replayed_tli"
)

# Run on the primary after a read: a barrier (everything before its commit
# record is on the synchronous standbys once it returns), and the primary's
# WAL write position and timeline taken before that commit.
_PRIMARY_GATE = (
    "SELECT pg_current_wal_lsn()::text AS lsn,"
    " ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int AS tli"
    " FROM booking_sync_barrier() b"
)


async def _primary_gate(db: Database) -> asyncpg.Record:
    """`_PRIMARY_GATE` on the primary, stamped as a write is."""

    async def work(conn: Connection) -> asyncpg.Record:
        statement, values = stamped(_PRIMARY_GATE, [])
        row: asyncpg.Record = await conn.fetchrow(statement, *values)
        return row

    return await db.run(work, intent=Intent.WRITE, single_statement=True)


# Everything at or before this position may have been pruned (at most one row).
_PRUNED = "booking_event_horizon"


# Enum members by value, without the Enum call's machinery (every row read).
_STATUS = {s.value: s for s in AppointmentStatus}
_PRIORITY = {p.value: p for p in Priority}
_TYPE = {t.value: t for t in EventType}


def event_from_row(row: asyncpg.Record) -> AppointmentEvent:
    appointment = Appointment(
        id=row["appointment_id"],
        user_id=row["user_id"],
        specialist_id=row["specialist_id"],
        slot_id=row["time_slot_id"],
        status=_STATUS[row["new_status"]],
        priority=_PRIORITY[row["priority"]],
        start_time=row["start_time"],
        end_time=row["end_time"],
        expires_at=row["expires_at"],
        created_at=row["appointment_created_at"],
        updated_at=row["created_at"],
        party_size=row.get("party_size") or 1,
        series_id=row.get("series_id"),
    )
    old = row["old_status"]
    return AppointmentEvent(
        id=row["id"],
        position=Position(row["xid"], row["seq"]),
        type=_TYPE[row["event_type"]],
        created_at=row["created_at"],
        old_status=_STATUS[old] if old else None,
        appointment=appointment,
        actor_id=row["actor_id"],
        reason=row["reason"],
        previous_slot_id=row["previous_slot_id"],
        waitlist_entry_id=row.get("waitlist_entry_id"),
    )


async def read_after(
    db: Database,
    after: Position,
    filter_: EventFilter,
    limit: int,
    *,
    gate: Database | None = None,
) -> tuple[list[AppointmentEvent], Position, bool]:
    """Up to `limit` stable events after `after`, how far the read got, and
    whether newer events exist that are not yet stable.

    The position returned is the last event read or, when the read reached
    the horizon, the newest stable event of the whole log (filter or not):
    a consumer may resume from it without missing anything, even if the
    filter matched nothing. It is always the position of a committed event
    (or `after`), never the horizon itself: after a crash PostgreSQL can
    hand out xids below a horizon it showed before (docs/events.md). One
    statement, so one snapshot: the horizon and the newest event match the
    rows.

    `db` may be a hot standby: then the durability gate runs on `gate`
    (the primary; `db` itself when None, with a write's intent so routing
    sends it to the primary) after the read, and nothing is returned that
    the gate could not prove is on the synchronous standbys.
    """

    where = Conditions()
    where.add("(e.xid, e.seq) > ({}::text::xid8, {}::bigint)", str(after.xid), after.seq)
    where.add_if(filter_.specialist_id, "e.specialist_id = {}")
    where.add_if(filter_.user_id, "e.user_id = {}")
    where.add_if(filter_.appointment_id, "e.appointment_id = {}")
    where.add_if(sorted(t.value for t in filter_.types) or None, "e.event_type = ANY({}::text[])")
    present = (
        "EXISTS (SELECT 1 FROM appointment_events q"
        f" WHERE q.xid = {where.arg(str(after.xid))}::text::xid8"
        f" AND q.seq = {where.arg(after.seq)}::bigint)"
    )
    sql = (
        "WITH h AS (SELECT x, EXISTS (SELECT 1 FROM appointment_events p WHERE p.xid >= x)"
        f" AS pending, {present} AS present, {_GATE}"
        f" FROM (SELECT {_HORIZON} AS x) s, {_RECOVERY})"
        " SELECT h.pending, h.present, h.standby, h.synchronous, h.replayed, h.replayed_tli,"
        " head.xid AS head_xid, head.seq AS head_seq,"
        " c.pruned_xid::text::bigint AS pruned_xid, c.pruned_seq, ev.*,"
        " w.id AS waitlist_entry_id, ap.party_size, ap.series_id"
        f" FROM h LEFT JOIN {_PRUNED} c ON true"
        f" LEFT JOIN LATERAL ({_STABLE_HEAD}) head ON true"
        " LEFT JOIN LATERAL ("
        f"  SELECT {EVENT_COLUMNS} FROM appointment_events e"
        "  WHERE e.xid < h.x"
        "   AND (c.pruned_xid IS NULL OR (e.xid, e.seq) > (c.pruned_xid, c.pruned_seq))"
        f"{where.sql()}"
        f"  ORDER BY e.xid, e.seq LIMIT {where.arg(limit)}"
        f" ) ev ON true{_WAITLIST_JOIN}{_APPOINTMENT_JOIN} ORDER BY ev.xid, ev.seq"
    )
    rows = await db.fetch(sql, *where.args, intent=Intent.READ)
    await _gate_after(gate or db, rows[0])
    pruned = _pruned(rows[0])
    _refuse_compacted(after, pruned)
    if not rows[0]["present"] and rows[0]["standby"] and _names_an_event(after):
        # A standby that has not replayed the cursor's event yet (the
        # cursor came from a node further ahead), or a lost cursor: the
        # primary decides which. Behind: nothing to read here yet.
        await _resume_point(gate or db, after, Intent.WRITE)
        return [], after, True
    _refuse_lost(after, pruned, bool(rows[0]["present"]))
    pending = bool(rows[0]["pending"])
    events = [event_from_row(r) for r in rows if r["id"] is not None]
    if len(events) == limit:
        return events, events[-1].position, True
    # Everything below the horizon has been read.
    return events, max(_head(rows[0]), after, pruned), pending


async def resume_point(db: Database, after: Position, *, gate: Database | None = None) -> Position:
    """Where a reader asking to resume after `after` starts: `after` itself,
    or the pruning horizon when `after` is the start of the log and history
    has been pruned. Raises CursorCompacted when events after `after` may
    have been pruned, and CursorNotInHistory when `after` is the position
    of an event the database does not have (docs/events.md, "Failover").
    On a standby that lacks the event, the primary (`gate`) decides: the
    standby may only be behind the node that handed the cursor out."""
    return await _resume_point(db, after, Intent.READ, gate=gate)


async def _resume_point(
    db: Database, after: Position, intent: Intent, *, gate: Database | None = None
) -> Position:
    row = await db.fetchrow(
        "SELECT c.pruned_xid::text::bigint AS pruned_xid, c.pruned_seq, r.standby,"
        " EXISTS (SELECT 1 FROM appointment_events e"
        "  WHERE e.xid = $1::text::xid8 AND e.seq = $2::bigint) AS present"
        f" FROM {_RECOVERY} LEFT JOIN {_PRUNED} c ON true",
        str(after.xid),
        after.seq,
        intent=intent,
    )
    assert row is not None  # one row always: the LEFT JOIN from one row
    pruned = _pruned(row)
    _refuse_compacted(after, pruned)
    if not row["present"] and row["standby"] and _names_an_event(after):
        if intent is Intent.WRITE:
            raise DatabaseUnavailable()  # the primary's answer is needed, not a standby's
        await _resume_point(gate or db, after, Intent.WRITE)
        return after
    _refuse_lost(after, pruned, bool(row["present"]))
    return max(after, pruned)


async def _gate_after(gate: Database, row: asyncpg.Record) -> None:
    """After a read, prove that what it showed survives any failover the
    primary's durability covers. On the primary: a barrier there returned.
    On a hot standby (`row["standby"]`): the standby streams on the
    primary's timeline, so its WAL is a prefix of the primary's, and a
    barrier on the primary returned after a position at or past the
    standby's replay position, so everything the standby had replayed is on
    the synchronous standbys. Otherwise the read is not delivered:
    DatabaseUnavailable, tried again by the caller."""
    if not row["standby"]:
        # Without synchronous standbys when the read ran, the barrier would
        # write nothing (it looks at the same setting): no round trip.
        if row["synchronous"]:
            await _primary_gate(gate)
        return
    replayed, tli = row["replayed"], row["replayed_tli"]
    if replayed is None or tli is None:
        raise DatabaseUnavailable()  # not streaming (or not allowed to see it)
    try:
        primary = await _primary_gate(gate)
    except asyncpg.ObjectNotInPrerequisiteStateError as exc:  # the "primary" is in recovery
        raise DatabaseUnavailable() from exc
    assert primary is not None
    if int(primary["tli"]) != int(tli) or lsn_value(str(primary["lsn"])) < lsn_value(str(replayed)):
        raise DatabaseUnavailable()


def lsn_value(lsn: str) -> int:
    """A pg_lsn's text ('16/B374D848') as a number, for comparisons."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


async def replay_position(db: Database) -> str | None:
    """How far `db` has replayed WAL (None on a primary): cheap and local,
    polled by a stream served from a standby to learn of new events."""
    value = await db.fetchval("SELECT pg_last_wal_replay_lsn()::text", intent=Intent.READ)
    return None if value is None else str(value)


def _refuse_lost(after: Position, pruned: Position, present: bool) -> None:
    # A position handed out names an event; one the database does not have
    # (and did not prune) is from a history a failover discarded.
    if not present and _names_an_event(after) and after != pruned:
        raise CursorNotInHistory(
            cursor=f"{after.xid}-{after.seq}", restart_cursor=f"{pruned.xid}-{pruned.seq}"
        )


def _names_an_event(position: Position) -> bool:
    """Every position the service hands out is an event's, except the start
    (0-0) and the horizon cursors of earlier versions (seq 0), which name
    none and are taken as they are."""
    return position.seq > 0


def _pruned(row: asyncpg.Record) -> Position:
    if row["pruned_xid"] is None:
        return Position.start()
    return Position(int(row["pruned_xid"]), int(row["pruned_seq"]))


def _refuse_compacted(after: Position, pruned: Position) -> None:
    # The start of the log is not a promise of any event: a reader starting
    # there begins after the horizon. Any other cursor below the horizon
    # would silently skip the events pruned after it.
    if after != Position.start() and after < pruned:
        raise CursorCompacted(
            cursor=f"{after.xid}-{after.seq}", oldest_cursor=f"{pruned.xid}-{pruned.seq}"
        )


async def stable_head(db: Database, *, gate: Database | None = None) -> Position:
    """The position a reader starting 'now' should resume after: the newest
    event below the horizon, or the start of the log if there is none."""
    row = await db.fetchrow(
        f"WITH h AS (SELECT {_HORIZON} AS x, {_GATE} FROM {_RECOVERY})"
        f" SELECT h.standby, h.synchronous, h.replayed, h.replayed_tli, head.xid, head.seq"
        f" FROM h LEFT JOIN LATERAL ({_STABLE_HEAD}) head ON true",
        intent=Intent.READ,
    )
    assert row is not None  # one row: the LEFT JOIN from h
    await _gate_after(gate or db, row)
    if row["xid"] is None:
        return Position.start()
    return Position(int(row["xid"]), int(row["seq"]))


def _head(row: asyncpg.Record) -> Position:
    if row["head_xid"] is None:
        return Position.start()
    return Position(int(row["head_xid"]), int(row["head_seq"]))


# NOTIFY channel of new events (storage/listener.py listens on it).
CHANNEL = "booking_appointment_events"
