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
from storage.database import Database, Intent
from storage.errors import CursorCompacted
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
    db: Database, after: Position, filter_: EventFilter, limit: int
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
    """

    where = Conditions()
    where.add("(e.xid, e.seq) > ({}::text::xid8, {}::bigint)", str(after.xid), after.seq)
    where.add_if(filter_.specialist_id, "e.specialist_id = {}")
    where.add_if(filter_.user_id, "e.user_id = {}")
    where.add_if(filter_.appointment_id, "e.appointment_id = {}")
    where.add_if(sorted(t.value for t in filter_.types) or None, "e.event_type = ANY({}::text[])")
    sql = (
        "WITH h AS (SELECT x, EXISTS (SELECT 1 FROM appointment_events p WHERE p.xid >= x)"
        f" AS pending FROM (SELECT {_HORIZON} AS x) s)"
        " SELECT h.pending, head.xid AS head_xid, head.seq AS head_seq,"
        " c.pruned_xid::text::bigint AS pruned_xid, c.pruned_seq, ev.*,"
        " w.id AS waitlist_entry_id"
        f" FROM h LEFT JOIN {_PRUNED} c ON true"
        f" LEFT JOIN LATERAL ({_STABLE_HEAD}) head ON true"
        " LEFT JOIN LATERAL ("
        f"  SELECT {EVENT_COLUMNS} FROM appointment_events e"
        "  WHERE e.xid < h.x"
        "   AND (c.pruned_xid IS NULL OR (e.xid, e.seq) > (c.pruned_xid, c.pruned_seq))"
        f"{where.sql()}"
        f"  ORDER BY e.xid, e.seq LIMIT {where.arg(limit)}"
        f" ) ev ON true{_WAITLIST_JOIN} ORDER BY ev.xid, ev.seq"
    )
    rows = await db.fetch(sql, *where.args, intent=Intent.READ)
    pruned = _pruned(rows[0])
    _refuse_compacted(after, pruned)
    pending = bool(rows[0]["pending"])
    events = [event_from_row(r) for r in rows if r["id"] is not None]
    if len(events) == limit:
        return events, events[-1].position, True
    # Everything below the horizon has been read.
    return events, max(_head(rows[0]), after, pruned), pending


async def resume_point(db: Database, after: Position) -> Position:
    """Where a reader asking to resume after `after` starts: `after` itself,
    or the pruning horizon when `after` is the start of the log and history
    has been pruned. Raises CursorCompacted when events after `after` may
    have been pruned."""
    row = await db.fetchrow(
        f"SELECT c.pruned_xid::text::bigint AS pruned_xid, c.pruned_seq FROM {_PRUNED} c",
        intent=Intent.READ,
    )
    pruned = Position.start() if row is None else _pruned(row)
    _refuse_compacted(after, pruned)
    return max(after, pruned)


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


async def stable_head(db: Database) -> Position:
    """The position a reader starting 'now' should resume after: the newest
    event below the horizon, or the start of the log if there is none."""
    row = await db.fetchrow(
        f"SELECT head.* FROM (SELECT {_HORIZON} AS x) h, LATERAL ({_STABLE_HEAD}) head",
        intent=Intent.READ,
    )
    return Position.start() if row is None else Position(int(row["xid"]), int(row["seq"]))


def _head(row: asyncpg.Record) -> Position:
    if row["head_xid"] is None:
        return Position.start()
    return Position(int(row["head_xid"]), int(row["head_seq"]))


# NOTIFY channel of new events (storage/listener.py listens on it).
CHANNEL = "booking_appointment_events"
