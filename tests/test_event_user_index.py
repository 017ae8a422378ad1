"""A user's event read (what a CLIENT always asks for) is served by an
index on (user_id, xid, seq), not by scanning the whole log after the
cursor: its cost must not grow with everybody else's history."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from storage import events as events_store
from storage.database import Database
from storage.models import EventFilter, Position

OTHERS = 4000


async def _history(url: str, target: uuid.UUID) -> None:
    """OTHERS appointments with one event each for other users, and one for `target`."""
    conn = await asyncpg.connect(url)
    try:
        specialist = uuid.uuid4()
        await conn.execute(
            "INSERT INTO specialists (id, full_name, service_type) VALUES ($1, 'S', 'x')",
            specialist,
        )
        await conn.execute(
            "INSERT INTO users (id, email, password_hash, role)"
            " SELECT CASE WHEN g = 0 THEN $1 ELSE gen_random_uuid() END,"
            " 'u' || g || '@example.invalid', 'x', 'CLIENT' FROM generate_series(0, $2) g",
            target,
            OTHERS,
        )
        await conn.execute(
            "INSERT INTO time_slots (id, specialist_id, start_time, end_time)"
            " SELECT gen_random_uuid(), $1, now() - (g + 1) * interval '1 hour',"
            " now() - g * interval '1 hour' FROM generate_series(0, $2) g",
            specialist,
            OTHERS,
        )
        await conn.execute(
            "INSERT INTO appointments (id, user_id, specialist_id, time_slot_id, status)"
            " SELECT gen_random_uuid(), u.id, s.specialist_id, s.id, 'CONFIRMED'"
            " FROM (SELECT id, row_number() OVER (ORDER BY id) n FROM users"
            "       WHERE email LIKE 'u%@example.invalid') u"
            " JOIN (SELECT id, specialist_id, row_number() OVER (ORDER BY id) n"
            "       FROM time_slots WHERE specialist_id = $1) s ON s.n = u.n",
            specialist,
        )
        await conn.execute(
            "INSERT INTO appointment_events (id, appointment_id, event_type, new_status,"
            " time_slot_id, specialist_id, user_id, priority, start_time, end_time,"
            " appointment_created_at)"
            " SELECT gen_random_uuid(), a.id, 'CONFIRMED', 'CONFIRMED', a.time_slot_id,"
            " a.specialist_id, a.user_id, a.priority, s.start_time, s.end_time, a.created_at"
            " FROM appointments a JOIN time_slots s ON s.id = a.time_slot_id"
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


@pytest.mark.integration
async def test_a_users_event_read_uses_the_user_index(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = uuid.uuid4()
    await _history(database_url, target)

    captured: list[tuple[str, tuple[Any, ...]]] = []
    real_fetch = asyncpg.connection.Connection.fetch

    async def spy(self: asyncpg.Connection, query: str, *args: Any, **kw: Any) -> Any:
        captured.append((query, args))
        return await real_fetch(self, query, *args, **kw)

    monkeypatch.setattr(asyncpg.connection.Connection, "fetch", spy)
    db = await Database.connect(database_url, min_size=1, max_size=1)
    try:
        events, _, _ = await events_store.read_after(
            db, Position.start(), EventFilter(user_id=target), 50
        )
    finally:
        await db.close()
    monkeypatch.undo()
    assert [e.appointment.user_id for e in events] == [target]

    sql, args = next((q, a) for q, a in captured if "appointment_events e" in q)
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(f"EXPLAIN (COSTS OFF) {sql}", *args)
    finally:
        await conn.close()
    plan = "\n".join(str(r[0]) for r in rows)
    assert "appointment_events_user" in plan, plan
    assert "Seq Scan on appointment_events e" not in plan, plan
