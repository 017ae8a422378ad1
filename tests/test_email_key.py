"""Emails are one account however their case or accents are spelled:
uniqueness, login and login throttling share one Unicode-aware key."""

from __future__ import annotations

import sys
import unicodedata
import uuid

import asyncpg
import grpc
import pytest

from booking.v1 import user_pb2 as upb
from storage import migrate
from storage.users import email_key
from tests.support import PASSWORD, Api, expect_failure, rollback_through


def _tag() -> str:
    return uuid.uuid4().hex[:8]


async def _sign_up(api: Api, email: str) -> upb.User:
    anon = api.as_(None)
    reply = await anon.users.CreateUser(upb.CreateUserRequest(email=email, password=PASSWORD))
    return reply.user


async def test_emails_differing_only_in_unicode_case_or_composition_are_one_account(
    api: Api,
) -> None:
    tag = _tag()
    first = await _sign_up(api, f"Ärger-{tag}@example.com")
    for spelling in (
        f"ärger-{tag}@example.com",  # lower case, beyond ASCII
        f"A\u0308RGER-{tag}@EXAMPLE.COM",  # decomposed Ä, all upper case
    ):
        async with expect_failure(grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN"):
            await _sign_up(api, spelling)
        # ...and each spelling logs in to the one account.
        token = await api.login(spelling)
        assert await api.as_(token).user_id() == first.id
    # Full case folding, not just lower-casing: ß is ss.
    await _sign_up(api, f"straße-{tag}@example.com")
    async with expect_failure(grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN"):
        await _sign_up(api, f"STRASSE-{tag}@example.com")


async def test_login_throttling_counts_every_spelling_of_an_email_together(api: Api) -> None:
    tag = _tag()
    await _sign_up(api, f"Ölfass-{tag}@example.com")
    spellings = [
        f"Ölfass-{tag}@example.com",
        f"ölfass-{tag}@example.com",
        f"O\u0308LFASS-{tag}@example.com",
    ]
    for i in range(api.server.config.login_max_failures):
        async with expect_failure(grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS"):
            await api.login(spellings[i % len(spellings)], "not the password")
    for spelling in spellings:
        async with expect_failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "LOGIN_THROTTLED"):
            await api.login(spelling)


def _folding_characters() -> list[str]:
    """Every assigned character that case folding or decomposition changes,
    and a few that neither does."""
    out = ["a", "Z", "@", ".", "-", "é", "\u4e2d"]
    for cp in range(1, sys.maxunicode + 1):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        ch = chr(cp)
        if unicodedata.category(ch) == "Cn":
            continue  # unassigned in Python's tables; the database's may be newer
        if ch.casefold() != ch or unicodedata.normalize("NFD", ch) != ch:
            out.append(ch)
    return out


async def test_the_database_key_is_the_python_key(database_url: str) -> None:
    samples = _folding_characters()
    samples += [f"x{ch}Y{ch.upper()}" for ch in samples[:2000]]
    conn = await asyncpg.connect(database_url)
    try:
        got = await conn.fetch(
            "SELECT s, booking_email_key(s) AS k FROM unnest($1::text[]) s", samples
        )
    finally:
        await conn.close()
    wrong = [(r["s"], r["k"], email_key(r["s"])) for r in got if r["k"] != email_key(r["s"])]
    assert len(got) == len(samples)
    assert not wrong, f"{len(wrong)} differ, e.g. {wrong[:5]}"


async def _users_at_0004(database_url: str) -> asyncpg.Connection:
    rollback_through(database_url, "0006.email-key")
    assert "0006.email-key" not in migrate.applied(database_url)
    return await asyncpg.connect(database_url)


async def test_migrating_keys_existing_accounts_and_refuses_hidden_duplicates(
    database_url: str,
) -> None:
    insert = "INSERT INTO users (id, email, password_hash, role) VALUES ($1, $2, 'x', 'CLIENT')"
    conn = await _users_at_0004(database_url)
    try:
        # Two accounts the old ASCII-only index let in.
        await conn.execute(insert, uuid.uuid4(), "Ärger@example.com")
        await conn.execute(insert, uuid.uuid4(), "ärger@example.com")
    finally:
        await conn.close()
    with pytest.raises(Exception, match="differ only in case or accents"):
        migrate.apply(database_url)

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE users SET email = 'other@example.com' WHERE email = 'ärger@example.com'"
        )
    finally:
        await conn.close()
    assert migrate.apply(database_url)[0] == "0006.email-key"
    conn = await asyncpg.connect(database_url)
    try:
        keys = dict(await conn.fetch("SELECT email, booking_email_key(email) FROM users"))
    finally:
        await conn.close()
    assert keys == {
        "Ärger@example.com": "ärger@example.com",
        "other@example.com": "other@example.com",
    }
