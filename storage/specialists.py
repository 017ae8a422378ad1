"""SQL for specialists."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from uuid import UUID, uuid4

import asyncpg

from storage.conditions import Conditions
from storage.database import Database, Intent
from storage.errors import SpecialistNotFound
from storage.models import POLICY_FIELDS, BookingPolicy, Page, Specialist

_COLUMNS = (
    "id, full_name, service_type, is_active, created_at, updated_at, time_zone, "
    "buffer_before_minutes, buffer_after_minutes, " + ", ".join(POLICY_FIELDS)
)


def _specialist(row: asyncpg.Record) -> Specialist:
    return Specialist(
        id=row["id"],
        full_name=row["full_name"],
        service_type=row["service_type"],
        active=row["is_active"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        time_zone=row["time_zone"],
        policy=BookingPolicy(**{f: row[f] for f in POLICY_FIELDS}),
        buffer_before_minutes=row["buffer_before_minutes"],
        buffer_after_minutes=row["buffer_after_minutes"],
    )


async def create(
    db: Database,
    *,
    full_name: str,
    service_type: str,
    time_zone: str = "UTC",
    policy: BookingPolicy | None = None,
    buffer_before_minutes: int = 0,
    buffer_after_minutes: int = 0,
) -> Specialist:
    policy = policy or BookingPolicy()
    row = await db.fetchrow(
        "INSERT INTO specialists (id, full_name, service_type, time_zone, "
        "buffer_before_minutes, buffer_after_minutes, "
        + ", ".join(POLICY_FIELDS)
        + f") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {_COLUMNS}",
        uuid4(),
        full_name,
        service_type,
        time_zone,
        buffer_before_minutes,
        buffer_after_minutes,
        *(getattr(policy, f) for f in POLICY_FIELDS),
        intent=Intent.WRITE,
    )
    assert row is not None  # INSERT ... RETURNING
    return _specialist(row)


async def get(db: Database, specialist_id: UUID) -> Specialist:
    row = await db.fetchrow(
        f"SELECT {_COLUMNS} FROM specialists WHERE id = $1", specialist_id, intent=Intent.READ
    )
    if row is None:
        raise SpecialistNotFound(id=str(specialist_id))
    return _specialist(row)


async def list_(
    db: Database,
    *,
    service_type: str | None,
    active: bool | None,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> Page[Specialist]:
    where = Conditions()
    where.add_if(service_type, "service_type = {}")
    where.add_if(active, "is_active = {}")
    if after is not None:
        where.add("(created_at, id) > ({}, {})", after[0], after[1])
    sql = (
        f"SELECT {_COLUMNS} FROM specialists{where.sql(' WHERE ')}"
        f" ORDER BY created_at, id LIMIT {where.arg(limit + 1)}"
    )
    rows = await db.fetch(sql, *where.args, intent=Intent.READ)
    return Page([_specialist(r) for r in rows[:limit]], has_more=len(rows) > limit)


async def update(
    db: Database,
    specialist_id: UUID,
    *,
    full_name: str | None = None,
    service_type: str | None = None,
    active: bool | None = None,
    time_zone: str | None = None,
    policy: Mapping[str, int | None] | None = None,
    buffer_before_minutes: int | None = None,
    buffer_after_minutes: int | None = None,
) -> Specialist:
    """`policy` names the limits to set (None: back to the default).
    Buffers apply to holds made from now on (storage/sql/buffers.sql)."""
    policy = dict(policy or {})
    if not set(policy) <= set(POLICY_FIELDS):
        raise ValueError(f"unknown policy fields {sorted(set(policy) - set(POLICY_FIELDS))}")
    # Column names come from POLICY_FIELDS only; values are parameters.
    policy_sql = "".join(
        f" {name} = CASE WHEN ${8 + 2 * i} THEN ${9 + 2 * i}::integer ELSE {name} END,"
        for i, name in enumerate(POLICY_FIELDS)
    )
    policy_args: list[object] = []
    for name in POLICY_FIELDS:
        policy_args += [name in policy, policy.get(name)]
    row = await db.fetchrow(
        "UPDATE specialists SET"
        " full_name = coalesce($2, full_name),"
        " service_type = coalesce($3, service_type),"
        " is_active = coalesce($4, is_active),"
        " time_zone = coalesce($5, time_zone),"
        " buffer_before_minutes = coalesce($6, buffer_before_minutes),"
        " buffer_after_minutes = coalesce($7, buffer_after_minutes),"
        f"{policy_sql}"
        " updated_at = now()"
        f" WHERE id = $1 RETURNING {_COLUMNS}",
        specialist_id,
        full_name,
        service_type,
        active,
        time_zone,
        buffer_before_minutes,
        buffer_after_minutes,
        *policy_args,
        intent=Intent.WRITE,
    )
    if row is None:
        raise SpecialistNotFound(id=str(specialist_id))
    return _specialist(row)
