"""SQL for users."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from uuid import UUID, uuid4

import asyncpg

from storage.conditions import Conditions
from storage.database import Connection, Database, Intent
from storage.errors import UserNotFound
from storage.models import Page, Role, User

_COLUMNS = "id, email, role, is_active, created_at, updated_at"


def email_key(email: str) -> str:
    """The key emails are unique by and found by, as the database computes it
    (booking_email_key, migrations/0006): Unicode's canonical caseless match,
    NFC(casefold(NFD(email))). Tests compare the two."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", email).casefold())


def _user(row: asyncpg.Record) -> User:
    return User(
        id=row["id"],
        email=row["email"],
        role=Role(row["role"]),
        active=row["is_active"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def create(db: Database, *, email: str, password_hash: str, role: Role) -> User:
    row = await db.fetchrow(
        f"INSERT INTO users (id, email, password_hash, role) VALUES ($1, $2, $3, $4)"
        f" RETURNING {_COLUMNS}",
        uuid4(),
        email,
        password_hash,
        role.value,
        intent=Intent.WRITE,
    )
    assert row is not None  # INSERT ... RETURNING
    return _user(row)


async def get(db: Database, user_id: UUID) -> User:
    row = await db.fetchrow(
        f"SELECT {_COLUMNS} FROM users WHERE id = $1", user_id, intent=Intent.READ
    )
    if row is None:
        raise UserNotFound(id=str(user_id))
    return _user(row)


async def credentials(db: Database, email: str) -> tuple[User, str] | None:
    """The user with this email (in any case, composed or not) and its
    password hash."""
    row = await db.fetchrow(
        f"SELECT {_COLUMNS}, password_hash FROM users WHERE booking_email_key(email) = booking_email_key($1)",
        email,
        # Decides a login: a standby could still hold a changed password.
        intent=Intent.READ_PRIMARY,
    )
    return None if row is None else (_user(row), row["password_hash"])


async def set_password_hash(db: Database, user_id: UUID, old_hash: str, new_hash: str) -> None:
    """Swap in a rehashed password unless it changed meanwhile."""
    await db.execute(
        "UPDATE users SET password_hash = $3 WHERE id = $1 AND password_hash = $2",
        user_id,
        old_hash,
        new_hash,
        intent=Intent.WRITE,
    )


async def list_(
    db: Database,
    *,
    role: Role | None,
    active: bool | None,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> Page[User]:
    where = Conditions()
    where.add_if(role.value if role else None, "role = {}::user_role")
    where.add_if(active, "is_active = {}")
    if after is not None:
        where.add("(created_at, id) > ({}, {})", after[0], after[1])
    sql = (
        f"SELECT {_COLUMNS} FROM users{where.sql(' WHERE ')}"
        f" ORDER BY created_at, id LIMIT {where.arg(limit + 1)}"
    )
    rows = await db.fetch(sql, *where.args, intent=Intent.READ)
    return Page([_user(r) for r in rows[:limit]], has_more=len(rows) > limit)


async def update(
    db: Database,
    user_id: UUID,
    *,
    email: str | None = None,
    password_hash: str | None = None,
    role: Role | None = None,
    active: bool | None = None,
) -> User:
    """Change the given fields; deactivating also revokes every token."""

    async def work(conn: Connection) -> asyncpg.Record | None:
        row = await conn.fetchrow(
            "UPDATE users SET"
            " email = coalesce($2, email),"
            " password_hash = coalesce($3, password_hash),"
            " role = coalesce($4::user_role, role),"
            " is_active = coalesce($5, is_active),"
            " updated_at = now()"
            f" WHERE id = $1 RETURNING {_COLUMNS}",
            user_id,
            email,
            password_hash,
            role.value if role else None,
            active,
        )
        if row is not None and (active is False or password_hash is not None):
            await conn.execute(
                "UPDATE access_tokens SET revoked_at = now()"
                " WHERE user_id = $1 AND revoked_at IS NULL",
                user_id,
            )
        return row

    row = await db.run(work, intent=Intent.WRITE)
    if row is None:
        raise UserNotFound(id=str(user_id))
    return _user(row)
