"""Every write the service sends carries its caller's time bound, and the
database refuses a write that arrives after it (storage/database.py,
booking_commit_by in storage/sql/durability.sql, docs/cluster.md "A resumed
old primary"). Reads carry none."""

from __future__ import annotations

import datetime
import time
import uuid

import grpc
import pytest

from service.errors import code_for
from storage import deadline, errors
from storage.database import Connection, Database, Intent, UnstampedWrite, stamped
from tests.support import Api, expect_failure, hours_from_now

_BOUND = "SELECT current_setting('booking.commit_by', true)"


async def _bound_of(db: Database, *, intent: Intent, single: bool) -> str | None:
    async def work(conn: Connection) -> str | None:
        statement, values = stamped(_BOUND, [])
        value: str | None = await conn.fetchval(statement, *values)
        return value

    return await db.run(work, intent=intent, single_statement=single)


async def test_every_write_carries_its_callers_bound_and_reads_none(database_url: str) -> None:
    db = await Database.connect(database_url, min_size=1, max_size=1, commit_tolerance=0.5)
    try:
        for single in (False, True):
            sent = time.time()
            token = deadline.set_remaining(3.0)
            try:
                bound = await _bound_of(db, intent=Intent.WRITE, single=single)
            finally:
                deadline.reset(token)
            assert bound, f"single={single}: no bound"
            at = datetime.datetime.fromisoformat(bound).timestamp()
            # The call's remaining 3 s plus the tolerance, from when it was sent.
            assert sent + 3.0 < at <= time.time() + 3.5, (single, sent, at)
            # Without a deadline the client-side statement bound, capped.
            bound = await _bound_of(db, intent=Intent.WRITE, single=single)
            assert bound
            at = datetime.datetime.fromisoformat(bound).timestamp()
            assert sent < at <= time.time() + 10.5, (single, sent, at)
            assert not await _bound_of(db, intent=Intent.READ, single=single)
    finally:
        await db.close()


@pytest.mark.parametrize("single", [False, True], ids=["transaction", "single-statement"])
async def test_a_write_arriving_after_its_bound_is_refused_and_writes_nothing(
    database_url: str, single: bool
) -> None:
    # A tolerance of minus a minute puts the bound in the past at once: the
    # write arrives late, as one queued in a frozen node's socket does.
    db = await Database.connect(database_url, min_size=1, max_size=1, commit_tolerance=-60)
    key = f"bound-{uuid.uuid4()}"

    async def work(conn: Connection) -> None:
        if single:
            statement, values = stamped(
                "WITH written AS (INSERT INTO login_throttle (email_key, failures)"
                " VALUES ($1, 1) RETURNING 1) SELECT count(*) FROM written",
                [key],
            )
            await conn.fetchval(statement, *values)
        else:
            await conn.execute(
                "INSERT INTO login_throttle (email_key, failures) VALUES ($1, 1)", key
            )

    try:
        with pytest.raises(errors.CommitDeadlinePassed) as refused:
            await db.run(work, intent=Intent.WRITE, single_statement=single)
        assert code_for(refused.value) is grpc.StatusCode.UNAVAILABLE
        assert set(refused.value.metadata()) == {"commit_by"}
        count = await db.fetchval(
            "SELECT count(*) FROM login_throttle WHERE email_key = $1", key, intent=Intent.READ
        )
        assert count == 0
    finally:
        await db.close()


async def test_a_write_shortcut_carries_its_bound(database_url: str) -> None:
    # The shortcuts (the sweeps' batch functions, deletes) cannot take a
    # one-time filter: they run in a transaction whose BEGIN carries it.
    db = await Database.connect(database_url, min_size=1, max_size=1, commit_tolerance=0.5)
    try:
        assert await db.fetchval(_BOUND, intent=Intent.WRITE)
        assert not await db.fetchval(_BOUND, intent=Intent.READ)
    finally:
        await db.close()


async def test_a_single_statement_write_without_its_bound_is_never_sent(
    database_url: str,
) -> None:
    db = await Database.connect(database_url, min_size=1, max_size=1)
    key = f"unstamped-{uuid.uuid4()}"

    async def work(conn: Connection) -> None:
        await conn.execute("INSERT INTO login_throttle (email_key, failures) VALUES ($1, 1)", key)

    try:
        with pytest.raises(UnstampedWrite):
            await db.run(work, intent=Intent.WRITE, single_statement=True)
        count = await db.fetchval(
            "SELECT count(*) FROM login_throttle WHERE email_key = $1", key, intent=Intent.READ
        )
        assert count == 0
    finally:
        await db.close()


async def test_a_hold_refused_past_its_bound_is_applied_once_by_its_retry(api: Api) -> None:
    # The refusal is never stored as the request's outcome: the retry with
    # the same request id holds the slot, and a copy after it replays that.
    specialist = await api.specialist()
    slot = await api.slot(specialist.id, hours_from_now(30))
    caller, user_id = await api.client()
    request_id = str(uuid.uuid4())
    db = api.server.db
    assert db is not None
    db.commit_tolerance = -60  # every bound in the past: each write arrives late
    try:
        async with expect_failure(grpc.StatusCode.UNAVAILABLE, "COMMIT_DEADLINE_PASSED"):
            await caller.hold(slot.id, request_id=request_id)
    finally:
        db.commit_tolerance = 1.0
    held = await caller.hold(slot.id, request_id=request_id)
    again = await caller.hold(slot.id, request_id=request_id)
    assert held.user_id == user_id
    assert again == held
    count = await db.fetchval(
        "SELECT count(*) FROM appointments WHERE time_slot_id = $1",
        uuid.UUID(slot.id),
        intent=Intent.READ,
    )
    assert count == 1
