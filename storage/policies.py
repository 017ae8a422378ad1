"""SQL for the server-wide booking policy defaults (storage/sql/policies.sql)."""

from __future__ import annotations

from collections.abc import Mapping

from storage.database import Database, Intent
from storage.models import POLICY_FIELDS, BookingPolicy

_COLUMNS = ", ".join(POLICY_FIELDS)


async def defaults(db: Database) -> BookingPolicy:
    row = await db.fetchrow(f"SELECT {_COLUMNS} FROM booking_policy_defaults", intent=Intent.READ)
    return BookingPolicy(**dict(row)) if row else BookingPolicy(0, 0, 0)


async def set_defaults(db: Database, values: Mapping[str, int]) -> BookingPolicy:
    """Change the named defaults (0: no limit); every replica enforces the
    new values from the next transition on."""
    if not set(values) <= set(POLICY_FIELDS):
        raise ValueError(f"unknown policy fields {sorted(set(values) - set(POLICY_FIELDS))}")
    if any(v < 0 for v in values.values()):
        raise ValueError("policy limits must not be negative")
    # Column names come from POLICY_FIELDS only; values are parameters.
    params = [f"${i}::integer" for i in range(1, len(POLICY_FIELDS) + 1)]
    initial = ", ".join(f"coalesce({p}, 0)" for p in params)
    assignments = "".join(
        f" {name} = coalesce({p}, d.{name})," for p, name in zip(params, POLICY_FIELDS, strict=True)
    )
    row = await db.fetchrow(
        f"INSERT INTO booking_policy_defaults AS d (id, {_COLUMNS}) VALUES (true, {initial})"
        f" ON CONFLICT (id) DO UPDATE SET{assignments} updated_at = now()"
        f" RETURNING {_COLUMNS}",
        *(values.get(name) for name in POLICY_FIELDS),
        intent=Intent.WRITE,
    )
    assert row is not None  # INSERT ... RETURNING
    return BookingPolicy(**dict(row))
