"""Bulk test data written straight to the database, for tests that need
many users without paying for many argon2 hashes."""

from __future__ import annotations

import uuid

import asyncpg

# Not a valid argon2 hash, so these users can never log in.
UNUSABLE_HASH = "!no-login"


async def insert_clients(database_url: str, count: int) -> list[str]:
    ids = [uuid.uuid4() for _ in range(count)]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "INSERT INTO users (id, email, password_hash, role) VALUES ($1, $2, $3, 'CLIENT')",
            [(i, f"bulk-{i.hex}@example.com", UNUSABLE_HASH) for i in ids],
        )
    finally:
        await conn.close()
    return [str(i) for i in ids]


async def fetch(database_url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()
