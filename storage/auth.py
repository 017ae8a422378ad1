"""SQL for access tokens and login throttling."""

from __future__ import annotations

from datetime import datetime, timedelta
from uuid import UUID

from storage.database import Connection, Database, Intent, Isolation
from storage.models import Role, User

# Notified (by triggers, migrations/0004) with a user id whenever that user's
# tokens may have stopped working or the user's identity changed.
AUTH_CHANNEL = "booking_auth"


async def create_token(
    db: Database, *, user_id: UUID, token_hash: bytes, ttl: timedelta
) -> datetime:
    """Store a token's digest; returns when it expires."""
    expires: datetime = await db.fetchval(
        "INSERT INTO access_tokens (token_hash, user_id, expires_at)"
        " VALUES ($1, $2, now() + $3) RETURNING expires_at",
        token_hash,
        user_id,
        ttl,
        intent=Intent.WRITE,
    )
    return expires


async def resolve_token(db: Database, token_hash: bytes) -> tuple[User, float] | None:
    """The active user a live token belongs to, and the seconds until the
    token expires (by the database's clock, so a cache can count them down
    without trusting this host's clock), or None."""
    row = await db.fetchrow(
        "SELECT u.id, u.email, u.role, u.is_active, u.created_at, u.updated_at,"
        " extract(epoch FROM t.expires_at - clock_timestamp())::float8 AS remaining"
        " FROM access_tokens t JOIN users u ON u.id = t.user_id"
        " WHERE t.token_hash = $1 AND t.revoked_at IS NULL"
        " AND t.expires_at > clock_timestamp() AND u.is_active",
        token_hash,
        # Decides revocation: a standby could still show a revoked token.
        intent=Intent.READ_PRIMARY,
    )
    if row is None:
        return None
    user = User(
        id=row["id"],
        email=row["email"],
        role=Role(row["role"]),
        active=row["is_active"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
    return user, float(row["remaining"])


async def revoke_token(db: Database, token_hash: bytes) -> None:
    await db.execute(
        "UPDATE access_tokens SET revoked_at = now() WHERE token_hash = $1 AND revoked_at IS NULL",
        token_hash,
        intent=Intent.WRITE,
    )


async def take_attempt(db: Database, email: str, *, max_failures: int, window: timedelta) -> float:
    """Reserve one login attempt for `email`'s account key before its
    password is checked; 0 if granted, else seconds until one may be.

    The reservation counts as a failure until clear_failures: so however
    many attempts arrive at once, at most max_failures per window get as far
    as the (slow) password check. Granting the max_failures-th locks the key
    for `window` unless that attempt succeeds. READ COMMITTED, so that
    concurrent attempts queue on the row and each sees the count the one
    before left, instead of failing to serialize.
    """

    async def work(conn: Connection) -> float:
        granted = await conn.fetchval(
            "INSERT INTO login_throttle AS t (email_key, failures, window_start, locked_until)"
            " VALUES (booking_email_key($1), 1, now(),"
            "  CASE WHEN $2 <= 1 THEN now() + $3::interval END)"
            " ON CONFLICT (email_key) DO UPDATE SET"
            "  failures = CASE WHEN t.window_start < now() - $3::interval THEN 1"
            "   ELSE t.failures + 1 END,"
            "  window_start = CASE WHEN t.window_start < now() - $3::interval THEN now()"
            "   ELSE t.window_start END,"
            "  locked_until = CASE WHEN (CASE WHEN t.window_start < now() - $3::interval THEN 1"
            "   ELSE t.failures + 1 END) >= $2 THEN now() + $3::interval END"
            " WHERE t.locked_until IS NULL OR t.locked_until <= now()"
            " RETURNING true",
            email,
            max_failures,
            window,
        )
        if granted:
            return 0.0
        remaining = await conn.fetchval(
            "SELECT extract(epoch FROM locked_until - now())::float8 FROM login_throttle"
            " WHERE email_key = booking_email_key($1)",
            email,
        )
        return max(0.001, remaining or 0.0)

    return await db.run(work, intent=Intent.WRITE, isolation=Isolation.READ_COMMITTED)


async def clear_failures(db: Database, email: str) -> None:
    """A successful login: forget the key's attempts (its own included)."""
    await db.execute(
        "DELETE FROM login_throttle WHERE email_key = booking_email_key($1)",
        email,
        intent=Intent.WRITE,
    )
