"""SQL for webhook endpoints and their delivery state (storage/sql/webhooks.sql).

Delivery to one endpoint is serialised by a lease on its row: a replica
takes endpoints whose lease is free or expired (FOR UPDATE SKIP LOCKED, so
replicas never wait for each other), extends it while it works, and moves
the cursor only if it still holds the lease, in a transaction of its own
after the receiver answered 2xx. A replica that dies mid-delivery leaves
the cursor where it was; once its lease expires another one delivers the
same event again (at least once, deduplicated by the event id).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

import asyncpg

from storage.conditions import Conditions
from storage.database import Connection, Database, Intent
from storage.errors import WebhookEndpointNotFound
from storage.models import EventType, Page, Position

MAX_SECRETS = 5
_COLUMNS = (
    "id, url, event_types, secrets, enabled, disabled_reason,"
    " cursor_xid::text::bigint AS cursor_xid, cursor_seq, failures, last_error, delivered,"
    " created_at, updated_at"
)
# The newest stable event now (storage/events.py): a new endpoint starts after it.
_HEAD = (
    "(SELECT t.xid FROM appointment_events t"
    " WHERE t.xid < pg_snapshot_xmin(pg_current_snapshot())"
    " ORDER BY t.xid DESC, t.seq DESC LIMIT 1)"
)
_HEAD_SEQ = (
    "(SELECT t.seq FROM appointment_events t"
    " WHERE t.xid < pg_snapshot_xmin(pg_current_snapshot())"
    " ORDER BY t.xid DESC, t.seq DESC LIMIT 1)"
)

_PRUNED_XID = "(SELECT pruned_xid FROM booking_event_horizon)"
_PRUNED_SEQ = "(SELECT pruned_seq FROM booking_event_horizon)"


@dataclass(frozen=True)
class Endpoint:
    id: UUID
    url: str
    event_types: frozenset[EventType]
    # Newest first.
    secrets: tuple[str, ...]
    enabled: bool
    disabled_reason: str | None
    cursor: Position
    failures: int
    last_error: str | None
    delivered: int
    created_at: datetime
    updated_at: datetime


def _endpoint(row: asyncpg.Record) -> Endpoint:
    return Endpoint(
        id=row["id"],
        url=row["url"],
        event_types=frozenset(EventType(t) for t in row["event_types"]),
        secrets=tuple(row["secrets"]),
        enabled=row["enabled"],
        disabled_reason=row["disabled_reason"],
        cursor=Position(int(row["cursor_xid"]), int(row["cursor_seq"])),
        failures=row["failures"],
        last_error=row["last_error"],
        delivered=row["delivered"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def _one(db: Database, sql: str, *args: object, missing: UUID | None = None) -> Endpoint:
    async def work(conn: Connection) -> asyncpg.Record | None:
        return await conn.fetchrow(sql, *args)

    row = await db.run(work, intent=Intent.WRITE)
    if row is None:
        raise WebhookEndpointNotFound(id=str(missing))
    return _endpoint(row)


async def create(
    db: Database, *, url: str, event_types: frozenset[EventType], secret: str, actor_id: UUID
) -> Endpoint:
    """A new endpoint, whose cursor starts at the newest stable event (or,
    with none left, at the pruning horizon): it receives what commits from
    now on. Its cursor is the start of the log only if no event was ever
    pruned, so a cursor at the start with pruned history means events it
    should have had are gone (storage/events.py, CursorCompacted)."""
    return await _one(
        db,
        "INSERT INTO webhook_endpoints (id, url, event_types, secrets, created_by,"
        " cursor_xid, cursor_seq)"
        f" VALUES ($1, $2, $3, ARRAY[$4], $5, coalesce({_HEAD}, {_PRUNED_XID}, '0'),"
        f" coalesce({_HEAD_SEQ}, {_PRUNED_SEQ}, 0))"
        f" RETURNING {_COLUMNS}",
        uuid.uuid4(),
        url,
        sorted(t.value for t in event_types),
        secret,
        actor_id,
    )


async def get(db: Database, endpoint_id: UUID) -> Endpoint:
    return await _one(
        db,
        f"SELECT {_COLUMNS} FROM webhook_endpoints WHERE id = $1",
        endpoint_id,
        missing=endpoint_id,
    )


async def list_(
    db: Database, *, enabled: bool | None, after: tuple[datetime, UUID] | None, limit: int
) -> Page[Endpoint]:
    """Endpoints in (created_at, id) order after the keyset position
    `after` (webhook_endpoints_created)."""
    where = Conditions()
    where.add_if(enabled, "enabled = {}")
    if after is not None:
        where.add("(created_at, id) > ({}, {})", after[0], after[1])
    sql = (
        f"SELECT {_COLUMNS} FROM webhook_endpoints{where.sql(' WHERE ')}"
        f" ORDER BY created_at, id LIMIT {where.arg(limit + 1)}"
    )

    async def work(conn: Connection) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *where.args)
        return rows

    rows = await db.run(work, single_statement=True, intent=Intent.READ)
    return Page([_endpoint(r) for r in rows[:limit]], has_more=len(rows) > limit)


async def add_secret(
    db: Database, endpoint_id: UUID, secret: str, *, retire_previous: bool
) -> Endpoint:
    """Sign with `secret` from now on, and with the previous secrets too
    unless they are retired; at most MAX_SECRETS, the oldest dropped."""
    return await _one(
        db,
        "UPDATE webhook_endpoints SET updated_at = now(), secrets = CASE WHEN $3"
        f" THEN ARRAY[$2] ELSE (ARRAY[$2] || secrets)[1:{MAX_SECRETS}] END"
        f" WHERE id = $1 RETURNING {_COLUMNS}",
        endpoint_id,
        secret,
        retire_previous,
        missing=endpoint_id,
    )


async def enable(db: Database, endpoint_id: UUID) -> Endpoint:
    return await _one(
        db,
        "UPDATE webhook_endpoints SET enabled = true, disabled_reason = NULL, failures = 0,"
        " next_attempt_at = now(), updated_at = now()"
        f" WHERE id = $1 RETURNING {_COLUMNS}",
        endpoint_id,
        missing=endpoint_id,
    )


async def delete(db: Database, endpoint_id: UUID) -> None:
    async def work(conn: Connection) -> str:
        status: str = await conn.execute("DELETE FROM webhook_endpoints WHERE id = $1", endpoint_id)
        return status

    if (await db.run(work, intent=Intent.WRITE)).endswith(" 0"):
        raise WebhookEndpointNotFound(id=str(endpoint_id))


# --- delivery -------------------------------------------------------------


async def claim(
    db: Database, owner: str, *, lease: timedelta, limit: int, busy: list[UUID]
) -> list[Endpoint]:
    """Take the lease of up to `limit` enabled endpoints that are due and
    whose lease is free, expired or already `owner`'s, skipping `busy` ones
    and rows another replica is claiming at this moment."""
    if limit <= 0:
        return []
    sql = (
        "UPDATE webhook_endpoints w SET lease_owner = $1, lease_expires_at = now() + $2"
        " FROM (SELECT id FROM webhook_endpoints"
        "  WHERE enabled AND next_attempt_at <= now() AND NOT (id = ANY($4::uuid[]))"
        "   AND (lease_owner IS NULL OR lease_owner = $1 OR lease_expires_at < now())"
        "  ORDER BY next_attempt_at, id LIMIT $3 FOR UPDATE SKIP LOCKED) c"
        f" WHERE w.id = c.id RETURNING {', '.join('w.' + c.strip() for c in _COLUMNS.split(','))}"
    )

    async def work(conn: Connection) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await conn.fetch(sql, owner, lease, limit, busy)
        return rows

    return [_endpoint(r) for r in await db.run(work, intent=Intent.WRITE)]


async def renew(db: Database, endpoint_id: UUID, owner: str, lease: timedelta) -> Endpoint | None:
    """Extend `owner`'s unexpired lease; the endpoint as it is now (secrets
    rotated, cursor), or None when the lease is lost or the endpoint was
    disabled or deleted."""

    async def work(conn: Connection) -> asyncpg.Record | None:
        return await conn.fetchrow(
            "UPDATE webhook_endpoints SET lease_expires_at = now() + $3"
            " WHERE id = $1 AND lease_owner = $2 AND lease_expires_at > now() AND enabled"
            f" RETURNING {_COLUMNS}",
            endpoint_id,
            owner,
            lease,
        )

    row = await db.run(work, intent=Intent.WRITE)
    return None if row is None else _endpoint(row)


async def advance(
    db: Database,
    endpoint_id: UUID,
    owner: str,
    position: Position,
    *,
    delivered: int,
    lease: timedelta,
) -> bool:
    """Move the cursor forward to `position` (after a 2xx, or past events the
    type filter skips) and extend the lease; False when `owner` no longer
    holds the lease, so another replica now delivers and this one stops."""

    async def work(conn: Connection) -> str:
        status: str = await conn.execute(
            "UPDATE webhook_endpoints SET cursor_xid = $3::text::xid8, cursor_seq = $4,"
            " delivered = delivered + $5, failures = 0, lease_expires_at = now() + $6"
            " WHERE id = $1 AND lease_owner = $2"
            " AND (cursor_xid, cursor_seq) < ($3::text::xid8, $4::bigint)",
            endpoint_id,
            owner,
            str(position.xid),
            position.seq,
            delivered,
            lease,
        )
        return status

    return (await db.run(work, intent=Intent.WRITE)).endswith(" 1")


async def fail(
    db: Database,
    endpoint_id: UUID,
    owner: str,
    *,
    error: str,
    gone: bool,
    max_failures: int,
    backoff_base: float,
    backoff_max: float,
) -> tuple[bool, int]:
    """Record a failed attempt and give up the lease. The next attempt waits
    min(backoff_max, backoff_base * 2^(failures-1)) seconds, times a random
    factor in [0.5, 1) (jitter); the endpoint is disabled on HTTP 410
    (`gone`) or after `max_failures` in a row. Returns (still enabled,
    failures in a row)."""

    async def work(conn: Connection) -> asyncpg.Record | None:
        return await conn.fetchrow(
            "UPDATE webhook_endpoints SET failures = failures + 1, last_error = $3,"
            " next_attempt_at = now() + make_interval(secs => least($6::float8,"
            "  $5::float8 * power(2, least(failures, 30))) * (0.5 + random() / 2)),"
            " enabled = NOT ($4 OR failures + 1 >= $7),"
            " disabled_reason = CASE WHEN $4 THEN 'GONE' WHEN failures + 1 >= $7 THEN 'FAILURES'"
            "  END,"
            " lease_owner = NULL, lease_expires_at = NULL, updated_at = now()"
            " WHERE id = $1 AND lease_owner = $2 RETURNING enabled, failures",
            endpoint_id,
            owner,
            error,
            gone,
            backoff_base,
            backoff_max,
            max_failures,
        )

    row = await db.run(work, intent=Intent.WRITE)
    if row is None:
        return False, 0
    return bool(row["enabled"]), int(row["failures"])


async def disable(db: Database, endpoint_id: UUID, owner: str, reason: str) -> None:
    async def work(conn: Connection) -> None:
        await conn.execute(
            "UPDATE webhook_endpoints SET enabled = false, disabled_reason = $3,"
            " lease_owner = NULL, lease_expires_at = NULL, updated_at = now()"
            " WHERE id = $1 AND lease_owner = $2",
            endpoint_id,
            owner,
            reason,
        )

    await db.run(work, intent=Intent.WRITE)


async def release(db: Database, endpoint_id: UUID, owner: str) -> None:
    """Give up the lease (idle, or shutting down): another replica may take
    it. Claims go by next_attempt_at, so this puts the endpoint behind the
    ones that are waiting (round robin)."""

    async def work(conn: Connection) -> None:
        await conn.execute(
            "UPDATE webhook_endpoints SET lease_owner = NULL, lease_expires_at = NULL,"
            " next_attempt_at = greatest(next_attempt_at, now())"
            " WHERE id = $1 AND lease_owner = $2",
            endpoint_id,
            owner,
        )

    await db.run(work, intent=Intent.WRITE)
