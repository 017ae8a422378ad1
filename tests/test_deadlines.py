"""The caller's deadline bounds the database work, and an expired one is
logged as DEADLINE_EXCEEDED."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import grpc
import pytest

from booking.v1 import appointment_pb2 as apb
from service.auth import Authenticator
from service.errors import CODES, code_for
from service.interceptor import ServiceInterceptor
from storage import deadline, errors
from storage.database import Database, Intent
from tests.support import Api, hours_from_now


@pytest.fixture
async def locked_slot(api: Api, database_url: str) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A slot whose row a raw transaction holds FOR UPDATE."""
    specialist = await api.specialist()
    slot = await api.slot(specialist.id, hours_from_now(30))
    conn = await asyncpg.connect(database_url)
    await conn.execute("BEGIN")
    await conn.execute("SELECT 1 FROM time_slots WHERE id = $1 FOR UPDATE", slot.id)
    try:
        yield slot.id, conn
    finally:
        await conn.execute("ROLLBACK")
        await conn.close()


async def _waiting_holds(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'booking-service' AND wait_event_type = 'Lock'"
        )
    )


async def test_a_hold_on_a_locked_slot_ends_at_the_callers_deadline_and_its_query_with_it(
    api: Api, locked_slot: tuple[str, asyncpg.Connection], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="booking.rpc")
    slot_id, locker = locked_slot
    client, user_id = await api.client()
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await client.appointments.HoldSlot(
            apb.HoldSlotRequest(slot_id=slot_id), metadata=client.md, timeout=0.2
        )
    elapsed = time.monotonic() - started
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 5.0  # the statement timeout would be 30 s
    # The backend stops waiting for the lock soon after: the statement was
    # cancelled, not left to run out its 30 s.
    for _ in range(100):
        if await _waiting_holds(locker) == 0:
            break
        await asyncio.sleep(0.05)
    assert await _waiting_holds(locker) == 0
    # Logged as what it was, not as a cancellation.
    for _ in range(100):
        lines = [r for r in caplog.records if "HoldSlot" in r.getMessage()]
        if lines:
            break
        await asyncio.sleep(0.05)
    assert [getattr(r, "rpc_code", None) for r in lines] == ["DEADLINE_EXCEEDED"], [
        r.getMessage() for r in lines
    ]


async def test_database_run_answers_deadline_exceeded_when_the_deadline_passes(
    api: Api, locked_slot: tuple[str, asyncpg.Connection]
) -> None:
    slot_id, locker = locked_slot
    db = api.server.db
    assert isinstance(db, Database)

    async def lock(conn: asyncpg.Connection) -> None:
        await conn.execute("SELECT 1 FROM time_slots WHERE id = $1 FOR UPDATE", slot_id)

    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded):
        await db.run(lock, intent=Intent.WRITE, timeout=0.2)
    assert time.monotonic() - started < 5.0
    assert await _waiting_holds(locker) == 0

    # The same through the deadline the interceptor sets for a call.
    token = deadline.set_remaining(0.2)
    try:
        with pytest.raises(errors.DeadlineExceeded):
            await db.run(lock, intent=Intent.WRITE)
    finally:
        deadline.reset(token)
    # No deadline, no limit but the session's: the lock is free now.
    await locker.execute("COMMIT")
    await locker.execute("BEGIN")
    await db.run(lock, intent=Intent.WRITE)


def test_deadline_exceeded_has_its_own_code() -> None:
    assert errors.DeadlineExceeded in CODES
    assert code_for(errors.DeadlineExceeded()) == grpc.StatusCode.DEADLINE_EXCEEDED


class _Context:
    """Just what the interceptor's wrapper reads of a grpc.aio context."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def set_trailing_metadata(self, metadata: object) -> None:
        pass


async def test_the_interceptor_hands_the_calls_deadline_to_storage() -> None:
    seen: list[float | None] = []

    async def handler(request: object, context: object) -> str:
        seen.append(deadline.remaining())
        return "ok"

    interceptor = ServiceInterceptor(cast(Authenticator, None))
    for remaining in (5.0, None):
        # A task per call, as grpc.aio runs each RPC.
        wrapped = interceptor._unary("/t.T/M", handler, lambda r: r, True)
        call = cast(Any, wrapped(b"", cast(Any, _Context(remaining))))
        assert await asyncio.create_task(call) == "ok"
    assert seen[0] is not None and 4.0 < seen[0] <= 5.0
    assert seen[1] is None
