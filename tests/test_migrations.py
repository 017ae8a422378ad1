"""Migrations apply, roll back completely, and apply again."""

from __future__ import annotations

import asyncpg

from storage import migrate

_OBJECTS = """
SELECT
  (SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename NOT LIKE '\\_yoyo%'
      AND tablename <> 'yoyo_lock') AS tables,
  (SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
      WHERE n.nspname = 'public' AND t.typtype = 'e') AS enums,
  (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
      WHERE n.nspname = 'public' AND p.proname LIKE 'booking\\_%') AS functions
"""


async def _counts(url: str) -> tuple[int, int, int]:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(_OBJECTS)
    finally:
        await conn.close()
    return row["tables"], row["enums"], row["functions"]


async def test_every_migration_rolls_back_and_reapplies(database_url: str) -> None:
    applied = migrate.applied(database_url)
    assert applied == [
        "0001.core-schema",
        "0002.appointment-transitions",
        "0003.auth",
        "0004.auth-invalidation",
        "0006.email-key",
    ]
    before = await _counts(database_url)
    assert before[0] == 8 and before[1] == 4 and before[2] > 10

    rolled = migrate.rollback(database_url, count=len(applied))

    assert rolled == list(reversed(applied))
    assert await _counts(database_url) == (0, 0, 0)
    assert migrate.apply(database_url) == applied
    assert await _counts(database_url) == before
    assert migrate.apply(database_url) == []
