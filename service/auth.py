"""Authentication: opaque bearer tokens, login, and the caller of an RPC.

Tokens are random 256-bit strings; only their SHA-256 is stored, and every
RPC looks the digest up together with the user's is_active flag, so
deactivating a user or logging out takes effect on the very next call
(docs/auth.md explains the choice over JWTs).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from service import passwords
from service.config import Config
from service.errors import PermissionDenied, Unauthenticated
from service.policy import OPEN_PREFIXES, POLICIES
from storage import auth as auth_store
from storage import users as user_store
from storage.auth import AUTH_CHANNEL
from storage.database import Database
from storage.errors import InvalidCredentials, LoginThrottled
from storage.events import Listener
from storage.models import Role, User

log = logging.getLogger(__name__)

TOKEN_PREFIX = "bk_"


@dataclass(frozen=True)
class Caller:
    """Who is calling; `user` is None for anonymous calls."""

    user: User | None
    token_hash: bytes | None = None

    @property
    def role(self) -> Role | None:
        return self.user.role if self.user else None

    @property
    def is_staff(self) -> bool:
        return self.role in (Role.OPERATOR, Role.ADMIN)

    def require_user(self) -> User:
        if self.user is None:
            raise Unauthenticated()
        return self.user


ANONYMOUS = Caller(None)
_current: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller", default=ANONYMOUS)


def current() -> Caller:
    return _current.get()


def set_current(caller: Caller) -> contextvars.Token[Caller]:
    return _current.set(caller)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated(detail="authorization must be 'Bearer <token>'")
            return token.strip()
    return None


class TokenCache:
    """Recently resolved tokens, to spare most RPCs a database round trip.

    Trusted only while a listener on the auth channel is connected: any
    change that could end a token (deactivation, role or password change,
    logout) notifies every replica, which drops the user's entries; the
    cache is emptied whenever the listener (re)connects, and entries live
    at most `max_age` seconds regardless. A `generation` bump on every
    invalidation keeps a lookup that raced one from caching a stale answer.
    """

    MAX_ENTRIES = 10_000

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self.trusted = False
        self.generation = 0
        self._entries: dict[bytes, tuple[User, float]] = {}

    def get(self, token_hash: bytes) -> User | None:
        if not self.trusted:
            return None
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            del self._entries[token_hash]
            return None
        return entry[0]

    def put(self, token_hash: bytes, user: User, generation: int) -> None:
        if not self.trusted or generation != self.generation or self.max_age <= 0:
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
        self._entries[token_hash] = (user, time.monotonic() + self.max_age)

    def forget_user(self, user_id: UUID) -> None:
        self.generation += 1
        for key in [k for k, (u, _) in self._entries.items() if u.id == user_id]:
            del self._entries[key]

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()


class Authenticator:
    def __init__(self, db: Database, config: Config) -> None:
        self.db = db
        self.config = config
        self.cache = TokenCache(config.token_cache_seconds)
        self._follower: asyncio.Task[None] | None = None
        self._listener: Listener | None = None

    async def start(self) -> None:
        if self.config.token_cache_seconds > 0:
            self._follower = asyncio.create_task(self._follow(), name="auth-invalidations")

    async def stop(self) -> None:
        self.cache.trusted = False
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        if self._listener is not None:
            await self._listener.close()

    def _on_change(self, payload: str) -> None:
        try:
            self.cache.forget_user(UUID(payload))
        except ValueError:
            self.cache.clear()

    async def _follow(self) -> None:
        """Keep a listener for invalidations; trust the cache only while it lives."""
        while True:
            if self._listener is None or not self._listener.alive:
                self.cache.trusted = False
                self.cache.clear()
                try:
                    self._listener = await Listener.open(
                        self.db.dsn, self._on_change, channel=AUTH_CHANNEL
                    )
                    self.cache.trusted = True
                except Exception:  # noqa: BLE001 - without it, every call asks the database
                    log.warning("cannot LISTEN for auth changes; not caching tokens")
            await asyncio.sleep(1.0)

    def forget_user(self, user_id: UUID) -> None:
        """Drop this server's cached tokens of `user_id` (others get NOTIFY)."""
        self.cache.forget_user(user_id)

    async def _resolve(self, token_hash: bytes) -> User | None:
        # Checked on every use, not only by _follow's once-a-second look: a
        # listener that just died may have missed an invalidation.
        if self._listener is None or not self._listener.alive:
            self.cache.trusted = False
        cached = self.cache.get(token_hash)
        if cached is not None:
            return cached
        generation = self.cache.generation
        user = await auth_store.resolve_token(self.db, token_hash)
        if user is not None:
            self.cache.put(token_hash, user, generation)
        return user

    def is_open(self, method: str) -> bool:
        return method.startswith(OPEN_PREFIXES)

    async def authorize(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> Caller:
        """The caller of `method`, if its policy lets it call at all.

        Function-level only; object-level checks happen in the servicers.
        A method with no declared policy is refused (deny by default).
        """
        policy = POLICIES.get(method)
        if policy is None:
            raise PermissionDenied(method=method, detail=f"{method} has no access policy")
        token = bearer_token(metadata)
        if token is None:
            if policy.anonymous:
                return ANONYMOUS
            raise Unauthenticated()
        token_hash = digest(token)
        user = await self._resolve(token_hash)
        if user is None:
            if policy.anonymous:
                # A stale token must not stop anyone logging in again: where
                # anonymous calls are allowed, a bad token only adds nothing.
                return ANONYMOUS
            raise Unauthenticated(detail="the token is invalid, expired or revoked")
        caller = Caller(user, token_hash)
        if user.role not in policy.roles and not policy.anonymous:
            raise PermissionDenied(method=method)
        return caller

    async def login(self, email: str, password: str) -> tuple[str, datetime, User]:
        """A new token for valid credentials.

        Unknown email and wrong password fail the same way after the same
        work; failures are counted per email (known or not) and lock it out.
        """
        key = email.strip().lower()
        remaining = await auth_store.lockout_remaining(self.db, key)
        if remaining > 0:
            raise LoginThrottled(retry_after_seconds=max(1, round(remaining)))
        found = await user_store.credentials(self.db, email.strip())
        stored = found[1] if found else None
        ok = await passwords.verify(stored, password)
        if not ok or found is None or not found[0].active:
            await auth_store.record_failure(
                self.db,
                key,
                max_failures=self.config.login_max_failures,
                window=timedelta(seconds=self.config.login_lockout_seconds),
            )
            raise InvalidCredentials()
        user, stored_hash = found
        await auth_store.clear_failures(self.db, key)
        if passwords.needs_rehash(stored_hash):
            await user_store.set_password_hash(
                self.db, user.id, stored_hash, await passwords.hash_password(password)
            )
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires = await auth_store.create_token(
            self.db,
            user_id=user.id,
            token_hash=digest(token),
            ttl=timedelta(seconds=self.config.token_ttl_seconds),
        )
        return token, expires, user

    async def logout(self, caller: Caller) -> None:
        if caller.token_hash is not None:
            await auth_store.revoke_token(self.db, caller.token_hash)
            if caller.user is not None:
                self.forget_user(caller.user.id)
