"""Password hashing with argon2id at OWASP's parameters (m=19 MiB, t=2, p=1).

Hashing is CPU-heavy, so it runs in a worker thread to keep the event loop
responsive."""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 8
MAX_LENGTH = 128

HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, type=Type.ID)

# Verified when the email is unknown, so that answer takes as long as a
# wrong password does.
_DUMMY_HASH = HASHER.hash("no such user: timing equaliser")


def problem(password: str) -> str | None:
    """Why a new password is unacceptable, or None. Never truncated."""
    if len(password) < MIN_LENGTH or len(password) > MAX_LENGTH:
        return f"must be {MIN_LENGTH} to {MAX_LENGTH} characters"
    if "\x00" in password:
        return "must not contain NUL characters"
    return None


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(HASHER.hash, password)


def _verify(stored: str | None, password: str) -> bool:
    try:
        return HASHER.verify(stored or _DUMMY_HASH, password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


async def verify(stored: str | None, password: str) -> bool:
    """Check `password` against `stored`; with no stored hash, do the same
    work and fail."""
    return await asyncio.to_thread(_verify, stored, password)


def needs_rehash(stored: str) -> bool:
    return HASHER.check_needs_rehash(stored)
