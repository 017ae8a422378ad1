"""SQL for access tokens and login throttling."""

from __future__ import annotations

from datetime import datetime, timedelta
from uuid import UUID

import asyncpg

from storage.database import Connection, Database
from storage.models import Role, User

# Notified (by triggers, migrations/0004) with a user id whenever that user's
# tokens may have stopped working or the user's identity changed.
AUTH_CHANNEL = "booking_auth"


async def create_token(
    db: Database, *, user_id: UUID, token_hash: bytes, ttl: timedelta
) -> datetime:
    """Store a token's digest; returns when it expires."""

    async def work(conn: Connection) -> datetime:
        expires: datetime = await conn.fetchval(
            "INSERT INTO access_tokens (token_hash, user_id, expires_at)"
            " VALUES ($1, $2, now() + $3) RETURNING expires_at",
            token_hash,
            user_id,
            ttl,
        )
        return expires

    return await db.run(work, single_statement=True)


async def resolve_token(db: Database, token_hash: bytes) -> User | None:
    """The active user a live token belongs to, or None."""

    async def work(conn: Connection) -> asyncpg.Record | None:
        return await conn.fetchrow(
            "SELECT u.id, u.email, u.role, u.is_active, u.created_at, u.updated_at"
            " FROM access_tokens t JOIN users u ON u.id = t.user_id"
            " WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND t.expires_at > now()"
            " AND u.is_active",
            token_hash,
        )

    row = await db.run(work, single_statement=True, read_only=True)
    if row is None:
        return None
    return User(
        id=row["id"],
        email=row["email"],
        role=Role(row["role"]),
        active=row["is_active"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def revoke_token(db: Database, token_hash: bytes) -> None:
    async def work(conn: Connection) -> None:
        await conn.execute(
            "UPDATE access_tokens SET revoked_at = now()"
            " WHERE token_hash = $1 AND revoked_at IS NULL",
            token_hash,
        )

    await db.run(work, single_statement=True)


async def lockout_remaining(db: Database, email_key: str) -> float:
    """Seconds until `email_key` may try to log in again (0 if it may now)."""

    async def work(conn: Connection) -> float | None:
        value = await conn.fetchval(
            "SELECT extract(epoch FROM locked_until - now()) FROM login_throttle"
            " WHERE email_key = $1 AND locked_until > now()",
            email_key,
        )
        return None if value is None else float(value)

    remaining = await db.run(work, single_statement=True, read_only=True)
    return max(0.0, remaining or 0.0)


async def record_failure(
    db: Database, email_key: str, *, max_failures: int, window: timedelta
) -> None:
    """Count a failed login; the max_failures-th within `window` locks the
    account key for `window`."""

    async def work(conn: Connection) -> None:
        await conn.execute(
            "INSERT INTO login_throttle AS t (email_key, failures, window_start)"
            " VALUES ($1, 1, now())"
            " ON CONFLICT (email_key) DO UPDATE SET"
            "  failures = CASE WHEN t.window_start < now() - $3::interval THEN 1 ELSE t.failures + 1 END,"
            "  window_start = CASE WHEN t.window_start < now() - $3::interval THEN now()"
            "   ELSE t.window_start END,"
            "  locked_until = CASE"
            "   WHEN t.window_start >= now() - $3::interval AND t.failures + 1 >= $2 THEN now() + $3::interval"
            "   ELSE t.locked_until END",
            email_key,
            max_failures,
            window,
        )

    await db.run(work)


async def clear_failures(db: Database, email_key: str) -> None:
    async def work(conn: Connection) -> None:
        await conn.execute("DELETE FROM login_throttle WHERE email_key = $1", email_key)

    await db.run(work, single_statement=True)
