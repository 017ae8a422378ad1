"""Migrations apply, roll back completely, and apply again."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest

from storage import migrate
from tests.support import Api, hours_from_now, rollback_through

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
        "0005.idempotency-per-caller",
        "0006.email-key",
        "0007.sql-source-tree",
        "0008.event-retention",
        "0009.waitlist",
        "0010.schedules-policies",
        "0011.hold-cost",
        "0012.history-indexes",
        "0013.one-request-id-mechanism",
        "0020.seats",
        "0021.buffers",
        "0022.series",
        "0030.calendar-feeds",
        "0031.webhooks",
        "0040.sync-barrier",
        "0041.series-request-ids",
        "0042.series-transition-request-ids",
        "0043.waitlist-party-size",
        "0044.appointment-slot-times",
        "0045.buffer-probe-skip",
        "0046.appointment-slot-times-index",
        "0047.standby-lease",
        "0048.commit-by",
        "0049.hold-overlap-generic-plan",
        "0050.contract-previous-release",
    ]
    before = await _counts(database_url)
    assert before[0] == 17 and before[1] == 5 and before[2] > 10

    rolled = migrate.rollback(database_url, count=len(applied))

    assert rolled == list(reversed(applied))
    assert await _counts(database_url) == (0, 0, 0)
    assert migrate.apply(database_url) == applied
    assert await _counts(database_url) == before
    assert migrate.apply(database_url) == []


async def test_rolling_back_per_caller_request_ids_keeps_each_ids_oldest_success(
    api: Api, database_url: str
) -> None:
    first, _ = await api.client()
    second, _ = await api.client()
    spec = await api.specialist()
    request_id = str(uuid.uuid4())
    # Two callers' successes under one id, and a remembered failure.
    kept = await first.hold((await api.slot(spec.id, hours_from_now(20))).id, request_id=request_id)
    taken = await api.slot(spec.id, hours_from_now(21))
    await second.hold(taken.id, request_id=request_id)
    with pytest.raises(grpc.aio.AioRpcError):
        await first.hold(taken.id, request_id=str(uuid.uuid4()))
    await api.server.stop(grace=1)

    assert rollback_through(database_url, "0005.idempotency-per-caller")[-1] == (
        "0005.idempotency-per-caller"
    )

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT k.request_id, e.appointment_id FROM idempotency_keys k"
            " JOIN appointment_events e ON e.id = k.event_id"
        )
    finally:
        await conn.close()
    assert [(str(r["request_id"]), str(r["appointment_id"])) for r in rows] == [
        (request_id, kept.id)
    ]
    assert migrate.apply(database_url)[0] == "0005.idempotency-per-caller"


def test_only_the_contract_migrations_at_the_end_of_the_chain_wait(tmp_path: Path) -> None:
    """A contract migration waits for `--contract` while it ends the chain;
    once a newer release's migrations follow it, it applies in order."""

    @dataclass
    class Fake:
        id: str
        path: str

    def chain(*kinds: str) -> list[Fake]:
        out = []
        for n, kind in enumerate(kinds, start=1):
            path = tmp_path / f"{n:04d}.{kind}.sql"
            header = "-- contract: drops old names\n" if kind == "contract" else ""
            path.write_text(f"-- depends: x\n{header}SELECT 1;\n")
            out.append(Fake(path.stem, str(path)))
        return out

    assert migrate.due_contract(chain("expand", "expand", "contract")) == ["0003.contract"]
    assert migrate.due_contract(chain("expand", "contract", "contract")) == [
        "0002.contract",
        "0003.contract",
    ]
    assert migrate.due_contract(chain("expand", "contract", "expand")) == []
    assert migrate.due_contract(chain("expand")) == []


_FUNCTIONS = """
SELECT p.oid::regprocedure::text AS signature, p.proname AS name, p.prosrc AS body
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'public'
"""


async def _functions(url: str) -> dict[str, tuple[str, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(_FUNCTIONS)
    finally:
        await conn.close()
    return {r["signature"]: (r["name"], r["body"]) for r in rows}


async def test_no_expand_migration_drops_a_function_a_body_before_it_calls(
    database_url: str,
) -> None:
    """An expand migration applies under live traffic: a call that began
    before its commit may still be running the function bodies that were
    current then, and their statements are planned as they run, against the
    new catalog. So a function that any of those bodies calls may only be
    dropped by a contract migration, once nothing running can reach it.
    The chain is walked back one migration at a time, comparing the
    functions before and after each."""
    contract = set(migrate.contract_ids())
    offenders: list[str] = []
    after = await _functions(database_url)
    for migration in reversed(migrate.applied(database_url)):
        migrate.rollback(database_url, count=1)
        before = await _functions(database_url)
        if migration not in contract:
            for signature in before.keys() - after.keys():
                name = before[signature][0]
                call = re.compile(rf"\b{re.escape(name)}\s*\(")
                callers = sorted(
                    s for s, (_, body) in before.items() if s != signature and call.search(body)
                )
                if callers:
                    offenders.append(f"{migration} drops {signature}, called by {callers}")
        after = before
    assert not offenders, offenders
