"""The SQL source in storage/sql/ and the migrations build the same database.

One database is built by applying every migration, another by running the
source files; their catalogs (tables, columns, constraints, indexes, types,
functions with their bodies, triggers, extensions) must be identical. A
change made in one place only fails here, naming what differs.
"""

from __future__ import annotations

import re

import asyncpg
import pytest

from storage import schema

# Each query yields (kind, name, definition) rows for one kind of object.
_CATALOG = {
    "extension": "SELECT extname, '' FROM pg_extension WHERE extname <> 'plpgsql'",
    "enum": """
        SELECT t.typname, string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
        FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
        JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = 'public' GROUP BY t.typname""",
    # Compared by name, not position: a column added by a migration comes
    # last, while the source lists it where it reads best.
    "column": """
        SELECT c.relname || '.' || a.attname,
               concat_ws(' ', format_type(a.atttypid, a.atttypmod),
                         CASE WHEN a.attnotnull THEN 'NOT NULL' END,
                         'DEFAULT ' || pg_get_expr(d.adbin, d.adrelid),
                         NULLIF(a.attidentity, ''), NULLIF(a.attgenerated, ''))
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm')
          AND a.attnum > 0 AND NOT a.attisdropped
          AND c.relname NOT LIKE '%yoyo%'""",
    "constraint": """
        SELECT conrelid::regclass::text || '.' || conname, pg_get_constraintdef(oid)
        FROM pg_constraint
        WHERE connamespace = 'public'::regnamespace AND conrelid <> 0
          AND conrelid::regclass::text NOT LIKE '%yoyo%'""",
    "index": """
        SELECT indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'public' AND tablename NOT LIKE '%yoyo%'""",
    "function": """
        SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
               pg_get_functiondef(p.oid)
        FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
          AND NOT EXISTS (SELECT 1 FROM pg_depend d
                          WHERE d.objid = p.oid AND d.deptype = 'e')""",
    "trigger": """
        SELECT tgrelid::regclass::text || '.' || tgname, pg_get_triggerdef(oid)
        FROM pg_trigger WHERE NOT tgisinternal""",
    "sequence": """
        SELECT sequencename, data_type::text FROM pg_sequences
        WHERE schemaname = 'public'""",
}


def _normalise(definition: str) -> str:
    # Whitespace is layout, not meaning; everything else must match.
    return re.sub(r"\s+", " ", definition).strip()


async def _catalog(url: str) -> dict[tuple[str, str], str]:
    conn = await asyncpg.connect(url)
    try:
        out: dict[tuple[str, str], str] = {}
        for kind, sql in _CATALOG.items():
            for name, definition in await conn.fetch(sql):
                out[(kind, name)] = _normalise(definition)
        return out
    finally:
        await conn.close()


@pytest.fixture
async def source_database_url(empty_database_url: str) -> str:
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute(schema.source_sql())
    finally:
        await conn.close()
    return empty_database_url


async def test_migrations_build_exactly_the_sql_source(
    database_url: str, source_database_url: str
) -> None:
    migrated = await _catalog(database_url)
    source = await _catalog(source_database_url)

    only_migrated = sorted(set(migrated) - set(source))
    only_source = sorted(set(source) - set(migrated))
    different = sorted(k for k in set(migrated) & set(source) if migrated[k] != source[k])
    assert not only_migrated, f"made by migrations but missing from storage/sql: {only_migrated}"
    assert not only_source, f"in storage/sql but no migration makes it: {only_source}"
    assert not different, "defined differently:\n" + "\n".join(
        f"{kind} {name}\n  migrations: {migrated[(kind, name)]}\n  source:     {source[(kind, name)]}"
        for kind, name in different
    )
    # The comparison covers every kind of object the schema has.
    assert {kind for kind, _ in migrated} == set(_CATALOG)


async def test_schema_drift_is_detected(database_url: str, source_database_url: str) -> None:
    # The guard itself must be able to fail: change one function body.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "CREATE OR REPLACE FUNCTION booking_require_snapshot_isolation() RETURNS void"
            " LANGUAGE plpgsql AS $$ BEGIN END $$"
        )
    finally:
        await conn.close()
    migrated = await _catalog(database_url)
    source = await _catalog(source_database_url)
    key = ("function", "booking_require_snapshot_isolation()")
    assert migrated[key] != source[key]
