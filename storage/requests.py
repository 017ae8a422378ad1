"""Request ids (AIP-155), the Python half: storage/sql/requests.sql holds the
rest. One mechanism for every operation that takes a request id (the
transitions, CreateWaitlistEntry, MaterializeSchedule, HoldSeries): one table of keys
per caller, one fingerprint rule, one retention (the sweeper's
booking_forget_request_ids), and the same replay of a first success or
business failure."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from uuid import UUID

import asyncpg

from storage import durability, errors
from storage import functions as fn
from storage.database import Connection, Database, Intent, stamped

_REMEMBER = fn.REMEMBER_FAILURE.statement(
    {"p_key": "$1::jsonb", "p_reason": "$2", "p_detail": "$3::jsonb"}
)
_OUTCOME = fn.REQUEST_OUTCOME.statement(
    {"p_operation": "$1", "p_actor_id": "$2", "p_request_id": "$3", "p_params": "$4::text[]"}
)
T = TypeVar("T")
_FINISH = fn.FINISH_REQUEST_RESULT.statement({"p_result": "$1::jsonb"})


async def call(
    db: Database,
    sql: str,
    args: Sequence[Any],
    on_send: Callable[[], None] | None = None,
    *,
    replayable: bool,
) -> asyncpg.Record:
    """Run one SQL function that may take a request id (a transition, joining
    the waitlist); with a request id, its business failure is remembered
    too, so every copy of the request gets one answer.

    A failure of a request that began executing names the request's key in
    the error's HINT (storage/sql/requests.sql). Storing it takes a second
    statement, its own implicit transaction: the failure has already
    aborted the first. If another copy's outcome was stored first, the
    request is replayed to answer with that outcome instead. A copy that
    committed concurrently makes the second statement fail with 40001 or
    the key's unique violation, and Database.run's retry replays.

    A `replayable` call (one with a request id) whose failure is the id's
    stored one (or a reused id) ran in a transaction that waited for nobody:
    a barrier makes sure the stored outcome is on the synchronous standbys
    before it is answered (storage/durability.py)."""

    async def work(conn: Connection) -> asyncpg.Record:
        if on_send is not None:
            on_send()
        # The write's time bound as the statement's one-time filter.
        statement, values = stamped(sql, args)
        try:
            return await conn.fetchrow(statement, *values)
        except asyncpg.PostgresError as exc:
            key = getattr(exc, "hint", None) if exc.sqlstate == "BK001" else None
            if not key:
                if exc.sqlstate == "BK001" and replayable:
                    # Its own implicit transaction: stamped as the first was.
                    await conn.execute(*_stamped(durability.BARRIER))
                raise
            stored = await conn.fetchval(
                *_stamped(
                    _REMEMBER, key, getattr(exc, "message", None), getattr(exc, "detail", None)
                )
            )
            if stored:
                raise
            return await conn.fetchrow(statement, *values)

    row: asyncpg.Record = await db.run(work, intent=Intent.WRITE, single_statement=True)
    return row


def _stamped(sql: str, *args: object) -> list[Any]:
    """`sql` and its arguments with the write's bound (storage/database.py
    stamped()), as a statement call's positional arguments."""
    statement, values = stamped(sql, args)
    return [statement, *values]


async def begin(
    conn: Connection, operation: str, actor_id: UUID | None, request_id: UUID, *params: str
) -> str | None:
    """Inside a transaction: the stored result (JSON text) of a caller's
    request id that already succeeded, or None for a new request, whose key
    the transaction then keeps for :func:`finish`. Raises the failure the
    id already has, or RequestIdReused for other parameters."""
    row = await conn.fetchrow(_OUTCOME, operation, actor_id, request_id, list(params))
    result: str | None = row["result"] if row is not None else None
    return result


async def finish(conn: Connection, result: str) -> None:
    """Inside the transaction that :func:`begin` found new: store its result
    (JSON text) under the request's key."""
    await conn.execute(_FINISH, result)


async def attempt(
    conn: Connection, statement: Callable[[], Awaitable[T]], *, replayable: bool
) -> T | errors.BookingError:
    """Inside a transaction of several statements, the counterpart of
    :func:`call`: run `statement` (one that may take a request id) in a
    savepoint, and return its business failure instead of raising it, for
    the caller to answer once the transaction has committed.

    A failure of a request that began executing (its key in the HINT) is
    stored under that key in this transaction, so every copy gets it. Under
    REPEATABLE READ a copy that stored an outcome after this snapshot makes
    the store fail with 40001, and Database.run's retry replays. A
    `replayable` statement's failure that is the id's stored one (or a
    reused id) makes this transaction's commit wait for the synchronous
    standbys first (the barrier)."""
    try:
        async with conn.transaction():
            return await statement()
    except asyncpg.PostgresError as exc:
        if exc.sqlstate != "BK001":
            raise
        domain = errors.translate(exc)
        if domain is None:
            raise
        key = getattr(exc, "hint", None)
        if key:
            await conn.fetchval(
                _REMEMBER, key, getattr(exc, "message", None), getattr(exc, "detail", None)
            )
        elif replayable:
            await durability.barrier(conn)
        return domain
