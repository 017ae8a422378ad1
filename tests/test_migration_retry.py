"""A migration that PostgreSQL aborts in a deadlock with live traffic is
applied again, and the chain goes on from it.

During a rolling upgrade a migration that takes table locks one after
another (CREATE TRIGGER on each table) can deadlock with a transition of
the previous release holding one of those tables and wanting the next.
Here the deadlock is made on purpose: another session holds table `b`,
the migration locks `a` then waits for `b`, and the other session then
asks for `a`. The migration's backend, waiting longest, finds the deadlock
and is aborted; the other session's transaction goes on and commits."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg
import pytest

from storage import migrate

LOCKS_A_THEN_B = """\
-- The two locks in the order the other session does not take them.
LOCK TABLE retry_a IN SHARE ROW EXCLUSIVE MODE;
LOCK TABLE retry_b IN SHARE ROW EXCLUSIVE MODE;
CREATE TABLE retry_applied (id int);
"""


async def _until_the_migration_waits_for_b(conn: asyncpg.Connection) -> None:
    # Wait until the migration holds `a` and waits for `b`.
    for _ in range(500):
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
            " WHERE c.relname = 'retry_b' AND NOT l.granted"
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the migration never waited for retry_b")


async def test_a_migration_aborted_by_a_deadlock_is_applied_again(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    setup = await asyncpg.connect(database_url)
    other = await asyncpg.connect(database_url)
    try:
        await setup.execute("CREATE TABLE retry_a (id int); CREATE TABLE retry_b (id int)")
        chain = tmp_path / "migrations"
        chain.mkdir()
        (chain / "9001.locks-a-then-b.sql").write_text(LOCKS_A_THEN_B)
        monkeypatch.setattr(migrate, "migrations_dir", lambda: chain)

        # The other session never checks for deadlocks first: the migration's
        # backend (1 s, the default) is the one that finds it and is aborted.
        await other.execute("SET deadlock_timeout = '30s'")
        tx = other.transaction()
        await tx.start()
        await other.execute("LOCK TABLE retry_b IN SHARE ROW EXCLUSIVE MODE")
        with caplog.at_level(logging.WARNING, logger="storage.migrate"):
            applying = asyncio.create_task(asyncio.to_thread(migrate.apply, database_url))
            await _until_the_migration_waits_for_b(other)
            # Deadlock: this waits for `a` until the migration is aborted.
            await other.execute("LOCK TABLE retry_a IN SHARE ROW EXCLUSIVE MODE")
            await other.execute("INSERT INTO retry_a VALUES (1)")
            await tx.commit()
            applied = await asyncio.wait_for(applying, 60)

        assert applied == ["9001.locks-a-then-b"]
        assert any("DeadlockDetected" in r.getMessage() for r in caplog.records)
        # The other session's work stands; the migration ran to its end once.
        assert await setup.fetchval("SELECT count(*) FROM retry_a") == 1
        assert await setup.fetchval("SELECT to_regclass('retry_applied') IS NOT NULL")
        assert migrate.applied(database_url)[-1] == "9001.locks-a-then-b"
    finally:
        await other.close()
        await setup.close()
