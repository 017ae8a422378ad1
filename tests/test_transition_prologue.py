"""The prologue every transition starts with (booking_begin_request) keeps
its guarantees in its cheaper form: no transition runs below REPEATABLE
READ, and a request with an id is remembered by its parameters."""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg
import pytest

from storage import functions as fn
from storage.models import Role
from tests.support import Api, hours_from_now


async def _hold_args(api: Api) -> list[object]:
    slot = await api.slot((await api.specialist()).id, hours_from_now(90))
    user_id, _ = await api.make_user(Role.CLIENT)
    return fn.HOLD_SLOT.values(
        slot_id=uuid.UUID(slot.id),
        user_id=uuid.UUID(user_id),
        priority="NORMAL",
        actor_id=uuid.UUID(user_id),
        hold_ttl=timedelta(minutes=5),
        check_user_overlap=True,
        request_id=None,
        policy_exempt=False,
        party_size=1,
    )


@pytest.mark.parametrize("isolation", ["read_committed", "repeatable_read"])
async def test_a_transition_refuses_to_run_below_repeatable_read(
    api: Api, database_url: str, isolation: str
) -> None:
    args = await _hold_args(api)
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction(isolation=isolation):
            if isolation == "read_committed":
                with pytest.raises(asyncpg.PostgresError) as raised:
                    await conn.fetchrow(fn.HOLD_SLOT.sql, *args)
                assert raised.value.sqlstate == "BK002"
                assert "REPEATABLE READ" in str(raised.value)
            else:
                row = await conn.fetchrow(fn.HOLD_SLOT.sql, *args)
                assert row is not None and row["event_type"] == "HELD"
    finally:
        await conn.close()
