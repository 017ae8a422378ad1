"""A release with 10,000 active waitlist entries stays cheap: the choice of
entry is served by the queue indexes (checked on the plan) and the time of
a cancel over gRPC is printed (run with -s), with no timing assertion (the
machine is shared). docs/waitlist.md quotes the figures."""

from __future__ import annotations

import statistics
import time
import uuid
from datetime import timedelta
from typing import Any

import asyncpg

from booking.v1 import appointment_pb2 as apb
from booking.v1 import waitlist_pb2 as wpb
from storage import events as event_store
from storage.models import EventFilter, Position
from tests.support import Api, hours_from_now

ENTRIES = 10_000
RELEASES = 20

# The query booking_waitlist_claimant_v2 runs, with the slot's values bound
# (and the seats to offer, $7).
QUEUE = """
SELECT q.id, q.queue_rank, q.seq FROM (
    (SELECT w.id, w.queue_rank, w.seq FROM waitlist_entries w
     WHERE w.status = 'ACTIVE' AND w.specialist_id = $1
       AND (w.queue_rank, w.seq) > ($5, $6) AND w.party_size <= $7
       AND tstzrange(w.window_start, w.window_end) @> tstzrange($2, $3)
     ORDER BY w.queue_rank, w.seq LIMIT 1)
    UNION ALL
    (SELECT w.id, w.queue_rank, w.seq FROM waitlist_entries w
     WHERE w.status = 'ACTIVE' AND w.service_type = $4
       AND (w.queue_rank, w.seq) > ($5, $6) AND w.party_size <= $7
       AND tstzrange(w.window_start, w.window_end) @> tstzrange($2, $3)
     ORDER BY w.queue_rank, w.seq LIMIT 1)
) q
ORDER BY q.queue_rank, q.seq
LIMIT 1
"""


class _Capture:
    """Stands in for Database: records the statement a read would run."""

    def __init__(self) -> None:
        self.sql = ""
        self.args: tuple[Any, ...] = ()

    async def run(self, work: Any, **_: Any) -> Any:
        capture = self

        class Conn:
            async def fetch(self, sql: str, *args: Any) -> list[Any]:
                capture.sql, capture.args = sql, args
                raise _Captured

        try:
            await work(Conn())
        except _Captured:
            pass
        raise _Captured

    async def fetch(self, sql: str, *args: Any, **_: Any) -> list[Any]:
        self.sql, self.args = sql, args
        raise _Captured


class _Captured(Exception):
    pass


async def _event_read_plan(conn: asyncpg.Connection, limit: int) -> str:
    """The plan of the event stream's read of `limit` events."""
    capture = _Capture()
    try:
        await event_store.read_after(capture, Position.start(), EventFilter(), limit)  # type: ignore[arg-type]
    except _Captured:
        pass
    rows = await conn.fetch("EXPLAIN (COSTS OFF) " + capture.sql, *capture.args)
    return "\n".join(r[0] for r in rows)


async def _releases(api: Api, bookings: list[str]) -> list[float]:
    times = []
    for booking in bookings:
        began = time.perf_counter()
        await api.appointments.CancelAppointment(
            apb.CancelAppointmentRequest(id=booking), metadata=api.md
        )
        times.append((time.perf_counter() - began) * 1000)
    return times


async def test_a_release_among_10000_active_entries_is_served_by_the_queue_index(
    api: Api, database_url: str
) -> None:
    spec = await api.specialist()
    base = hours_from_now(24 * 20)
    slots = [await api.slot(spec.id, base + timedelta(hours=i)) for i in range(3 * RELEASES)]
    bookings = []
    for slot in slots:
        held = await api.hold(slot.id)
        await api.appointments.ConfirmAppointment(
            apb.ConfirmAppointmentRequest(id=held.id), metadata=api.md
        )
        bookings.append(held.id)
    baseline = statistics.median(await _releases(api, bookings[:RELEASES]))
    # An offer each, with one waiter per slot: the cost of making an offer.
    for slot in slots[RELEASES : 2 * RELEASES]:
        _, waiter = await api.client()
        await api.waitlist.CreateWaitlistEntry(
            wpb.CreateWaitlistEntryRequest(
                user_id=waiter,
                specialist_id=spec.id,
                window_start_time=slot.start_time,
                window_end_time=slot.end_time,
            ),
            metadata=api.md,
        )
    one_each = statistics.median(await _releases(api, bookings[RELEASES : 2 * RELEASES]))

    conn = await asyncpg.connect(database_url)
    try:
        # 10,000 waiters, half for the specialist and half for its service
        # type, each with a day's window somewhere in the next 40 days and a
        # random priority: about one in forty holds a given slot.
        await conn.execute(
            "INSERT INTO users (id, email, password_hash, role)"
            " SELECT gen_random_uuid(), 'scale-' || g || '@example.com', '!', 'CLIENT'"
            " FROM generate_series(1, $1) g",
            ENTRIES,
        )
        await conn.execute(
            """
            INSERT INTO waitlist_entries (id, user_id, specialist_id, service_type,
                window_start, window_end, priority, offer_ttl, created_by)
            SELECT gen_random_uuid(), u.id,
                   CASE WHEN n % 2 = 0 THEN $1::uuid END,
                   CASE WHEN n % 2 = 1 THEN 'dentist' END,
                   date_trunc('hour', now()) + d * interval '1 day',
                   date_trunc('hour', now()) + (d + 1) * interval '1 day',
                   (ARRAY['NORMAL', 'VIP', 'URGENT'])[1 + n % 3]::appointment_priority,
                   interval '15 minutes', u.id
            FROM (SELECT id, row_number() OVER () AS n, (random() * 40)::int AS d
                  FROM users WHERE email LIKE 'scale-%') u
            """,
            uuid.UUID(spec.id),
        )
        await conn.execute("VACUUM ANALYZE waitlist_entries")
        slot_row = await conn.fetchrow(
            "SELECT start_time, end_time FROM time_slots WHERE id = $1",
            uuid.UUID(slots[2 * RELEASES].id),
        )
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + QUEUE,
                uuid.UUID(spec.id),
                slot_row["start_time"],
                slot_row["end_time"],
                "dentist",
                -1,
                0,
                1,
            )
        )
        event_plans = [await _event_read_plan(conn, n) for n in (50, 1000)]
    finally:
        await conn.close()

    with_entries = await _releases(api, bookings[2 * RELEASES :])
    print(f"\nqueue plan with {ENTRIES:,} active entries:\n{plan}")
    print(
        f"CancelAppointment over gRPC, median of {RELEASES}: {baseline:.2f} ms with nobody"
        f" waiting, {one_each:.2f} ms making an offer to the only waiter,"
        f" {statistics.median(with_entries):.2f} ms making an offer among {ENTRIES:,}"
        f" active entries (max {max(with_entries):.2f} ms)"
    )
    assert "waitlist_entries_specialist_queue" in plan
    assert "waitlist_entries_service_queue" in plan
    assert "Merge Append" in plan
    assert "Index Only Scan" in plan
    assert "Seq Scan" not in plan and "Sort" not in plan.replace("Sort Key", "")
    # The event stream names an offer's entry with an index probe per event
    # read, never a scan of the waitlist.
    for event_plan in event_plans:
        assert "waitlist_entries_offer" in event_plan, event_plan
        assert "Seq Scan on waitlist_entries" not in event_plan, event_plan
    # Every release went to a waiter.
    conn = await asyncpg.connect(database_url)
    try:
        offered = await conn.fetchval(
            "SELECT count(*) FROM waitlist_entries WHERE status = 'OFFERED'"
        )
    finally:
        await conn.close()
    assert offered == 2 * RELEASES
