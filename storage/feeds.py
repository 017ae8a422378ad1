"""SQL for calendar feeds (storage/sql/feeds.sql).

A feed belongs to one user or one specialist and has one secret token, of
which only the SHA-256 digest is stored: a leaked database does not leak
working feed URLs. Rotating replaces the digest, revoking deletes the row.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

import asyncpg

from storage.database import Connection, Database, Intent
from storage.errors import CalendarFeedNotFound, SpecialistNotFound, UserNotFound
from storage.models import AppointmentStatus

# A feed lists appointments that ended at most this long ago, and later ones,
# up to FEED_MAX_EVENTS, soonest first.
FEED_HISTORY = timedelta(days=31)
FEED_MAX_EVENTS = 2000


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token() -> str:
    """256 random bits, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Subject:
    """Whose appointments a feed lists: exactly one of the two."""

    user_id: UUID | None = None
    specialist_id: UUID | None = None

    def __post_init__(self) -> None:
        if (self.user_id is None) == (self.specialist_id is None):
            raise ValueError("a feed's subject is a user or a specialist")

    def not_found(self) -> Exception:
        if self.user_id is not None:
            return UserNotFound(id=str(self.user_id))
        return SpecialistNotFound(id=str(self.specialist_id))


@dataclass(frozen=True)
class FeedEntry:
    appointment_id: UUID
    status: AppointmentStatus
    start_time: datetime
    end_time: datetime
    created_at: datetime
    updated_at: datetime
    sequence: int
    specialist_id: UUID
    specialist_name: str
    time_zone: str


@dataclass(frozen=True)
class Feed:
    subject: Subject
    # The specialist's name and zone for a specialist feed; None for a user's.
    name: str | None
    time_zone: str | None
    entries: list[FeedEntry]


async def rotate(db: Database, subject: Subject, *, actor_id: UUID) -> tuple[str, datetime]:
    """Make or replace the subject's token; returns it and when it was made.
    Raises UserNotFound / SpecialistNotFound for a missing subject."""
    token = new_token()
    column = "user_id" if subject.user_id is not None else "specialist_id"
    table = "users" if subject.user_id is not None else "specialists"
    subject_id = subject.user_id or subject.specialist_id
    sql = (
        f"INSERT INTO calendar_feeds (id, {column}, token_sha256, created_by)"
        f" SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM {table} WHERE id = $2)"
        f" ON CONFLICT ({column}) WHERE {column} IS NOT NULL"
        " DO UPDATE SET token_sha256 = EXCLUDED.token_sha256, rotated_at = now(),"
        " created_by = EXCLUDED.created_by"
        " RETURNING rotated_at"
    )

    async def work(conn: Connection) -> datetime | None:
        value: datetime | None = await conn.fetchval(
            sql, uuid.uuid4(), subject_id, digest(token), actor_id
        )
        return value

    rotated_at = await db.run(work, intent=Intent.WRITE)
    if rotated_at is None:
        raise subject.not_found()
    return token, rotated_at


async def revoke(db: Database, subject: Subject) -> None:
    """Delete the subject's feed; CalendarFeedNotFound if it has none."""
    column = "user_id" if subject.user_id is not None else "specialist_id"
    subject_id = subject.user_id or subject.specialist_id

    async def work(conn: Connection) -> str:
        status: str = await conn.execute(
            f"DELETE FROM calendar_feeds WHERE {column} = $1", subject_id
        )
        return status

    status = await db.run(work, intent=Intent.WRITE)
    if status.endswith(" 0"):
        raise CalendarFeedNotFound(id=str(subject_id))


_ENTRIES = (
    "SELECT a.id, a.status, a.created_at, a.updated_at, s.start_time, s.end_time,"
    " a.specialist_id, sp.full_name, sp.time_zone, coalesce(c.sequence, 0) AS sequence"
    " FROM appointments a JOIN time_slots s ON s.id = a.time_slot_id"
    " JOIN specialists sp ON sp.id = a.specialist_id"
    " LEFT JOIN calendar_sequences c ON c.appointment_id = a.id"
    " WHERE a.{column} = $1 AND s.end_time > now() - $2::interval"
    " ORDER BY s.start_time, a.id LIMIT $3"
)


async def read(db: Database, token: str) -> Feed | None:
    """The feed whose token this is, or None (unknown, rotated or revoked)."""
    key = digest(token)

    async def work(conn: Connection) -> tuple[asyncpg.Record | None, list[asyncpg.Record]]:
        feed = await conn.fetchrow(
            "SELECT f.user_id, f.specialist_id, sp.full_name, sp.time_zone"
            " FROM calendar_feeds f LEFT JOIN specialists sp ON sp.id = f.specialist_id"
            " WHERE f.token_sha256 = $1",
            key,
        )
        if feed is None:
            return None, []
        column = "user_id" if feed["user_id"] is not None else "specialist_id"
        rows: list[asyncpg.Record] = await conn.fetch(
            _ENTRIES.format(column=column),
            feed["user_id"] or feed["specialist_id"],
            FEED_HISTORY,
            FEED_MAX_EVENTS,
        )
        return feed, rows

    feed, rows = await db.run(work, intent=Intent.READ)
    if feed is None:
        return None
    return Feed(
        subject=Subject(user_id=feed["user_id"], specialist_id=feed["specialist_id"]),
        name=feed["full_name"],
        time_zone=feed["time_zone"],
        entries=[
            FeedEntry(
                appointment_id=r["id"],
                status=AppointmentStatus(r["status"]),
                start_time=r["start_time"],
                end_time=r["end_time"],
                created_at=r["created_at"],
                updated_at=r["updated_at"],
                sequence=r["sequence"],
                specialist_id=r["specialist_id"],
                specialist_name=r["full_name"],
                time_zone=r["time_zone"],
            )
            for r in rows
        ],
    )
