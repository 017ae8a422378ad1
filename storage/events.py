"""SQL for the appointment event log.

Readers only see events below the oldest transaction still running
(``pg_snapshot_xmin``), ordered by (xid, seq). An event whose transaction
commits late therefore cannot be skipped: readers wait for it instead.
docs/events.md has the reasoning.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from storage.database import Connection, Database
from storage.models import (
    Appointment,
    AppointmentEvent,
    AppointmentStatus,
    EventFilter,
    EventType,
    Position,
    Priority,
)
from storage.sql import Conditions

EVENT_COLUMNS = (
    "e.id, e.xid::text::bigint AS xid, e.seq, e.appointment_id, e.event_type, e.old_status,"
    " e.new_status, e.time_slot_id, e.previous_slot_id, e.specialist_id, e.user_id,"
    " e.priority, e.start_time, e.end_time, e.expires_at, e.appointment_created_at,"
    " e.actor_id, e.reason, e.created_at"
)

# The stable horizon: every transaction with a smaller xid has finished.
_HORIZON = "pg_snapshot_xmin(pg_current_snapshot())"


def event_from_row(row: asyncpg.Record) -> AppointmentEvent:
    appointment = Appointment(
        id=row["appointment_id"],
        user_id=row["user_id"],
        specialist_id=row["specialist_id"],
        slot_id=row["time_slot_id"],
        status=AppointmentStatus(row["new_status"]),
        priority=Priority(row["priority"]),
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
        type=EventType(row["event_type"]),
        created_at=row["created_at"],
        old_status=AppointmentStatus(old) if old else None,
        appointment=appointment,
        actor_id=row["actor_id"],
        reason=row["reason"],
        previous_slot_id=row["previous_slot_id"],
    )


async def read_after(
    db: Database, after: Position, filter_: EventFilter, limit: int
) -> tuple[list[AppointmentEvent], Position, bool]:
    """Up to `limit` stable events after `after`, how far the read got, and
    whether newer events exist that are not yet stable.

    The position returned is the last event read or, when the read reached
    the horizon, the horizon itself: a consumer may resume from it without
    missing anything, even if the filter matched nothing. One statement, so
    one snapshot: the horizon always matches the rows.
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
        " SELECT h.x::text::bigint AS horizon, h.pending, ev.*"
        " FROM h LEFT JOIN LATERAL ("
        f"  SELECT {EVENT_COLUMNS} FROM appointment_events e"
        f"  WHERE e.xid < h.x{where.sql()}"
        f"  ORDER BY e.xid, e.seq LIMIT {where.arg(limit)}"
        " ) ev ON true ORDER BY ev.xid, ev.seq"
    )

    async def work(conn: Connection) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *where.args)
        return rows

    rows = await db.run(work, single_statement=True)
    horizon, pending = int(rows[0]["horizon"]), bool(rows[0]["pending"])
    events = [event_from_row(r) for r in rows if r["id"] is not None]
    if len(events) == limit:
        return events, events[-1].position, True
    # Everything below the horizon has been read; seq starts at 1.
    reached = max(Position(horizon, 0), after)
    return events, reached, pending


async def horizon(db: Database) -> Position:
    """The position a reader starting 'now' should resume after."""

    async def work(conn: Connection) -> int:
        return int(await conn.fetchval(f"SELECT {_HORIZON}::text::bigint"))

    return Position(await db.run(work, single_statement=True), 0)


CHANNEL = "booking_appointment_events"


class Listener:
    """A dedicated connection that LISTENs for, and announces, new events.

    NOTIFY is delivered only at commit and never replayed, so it is just a
    wake-up; readers always go back to the table. It is sent by the service
    after a transition commits, not by a trigger inside the transaction:
    PostgreSQL serialises the commits of notifying transactions (a global
    lock held through the commit's WAL flush), which cut hold throughput by
    more than half in our measurements (docs/events.md).
    """

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @classmethod
    async def open(
        cls,
        dsn: str,
        on_notify: Callable[[str], None],
        channel: str = CHANNEL,
        *,
        application_name: str = "booking-listener",
        connect_within: float = 60.0,
    ) -> Listener:
        """Listen on `channel`; `on_notify` gets each notification's payload."""
        conn = await asyncpg.connect(
            dsn, server_settings={"application_name": application_name}, timeout=connect_within
        )
        await conn.add_listener(channel, lambda _c, _pid, _ch, payload: on_notify(payload))
        return cls(conn)

    @property
    def alive(self) -> bool:
        return not self._conn.is_closed()

    async def ping(self, within: float) -> None:
        """One round trip, or an exception within `within` seconds.

        A half-open connection (its backend stopped, or the network gone
        quiet) still looks alive and silently delivers nothing; only a round
        trip shows it. PostgreSQL sends pending notifications before it
        answers, so after a ping every notification committed before it
        began has been delivered.
        """
        await self._conn.fetchval("SELECT 1", timeout=within)

    def terminate(self) -> None:
        """Drop the connection at once, without waiting for the server."""
        self._conn.terminate()

    async def announce(self) -> None:
        """Wake every listener (other replicas included)."""
        await self._conn.execute(f"NOTIFY {CHANNEL}")

    async def close(self) -> None:
        if not self._conn.is_closed():
            await self._conn.close(timeout=2)
