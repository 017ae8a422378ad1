"""Authentication: opaque bearer tokens, login, and the caller of an RPC.

Tokens are random 256-bit strings; only their SHA-256 is stored, and an
RPC's token is looked up together with the user's is_active flag (or found
in a cache that NOTIFY keeps honest and that never outlives a token's
expiry), so deactivating a user or logging out takes effect on the very
next call; open streams re-check their token when it may have changed
(docs/auth.md explains the choice over JWTs, and the cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
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
from storage.listener import KeptListener
from storage.models import Role, User

log = logging.getLogger(__name__)

TOKEN_PREFIX = "bk_"


@dataclass(frozen=True)
class Caller:
    """Who is calling; `user` is None for anonymous calls."""

    user: User | None
    token_hash: bytes | None = None
    # time.monotonic() at which the token expires.
    deadline: float | None = None

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

    Trusted only while the invalidation listener is known to be working (a
    round trip within the last TRUST_SECONDS): any change that could end a
    token (deactivation, role or password change, logout) notifies every
    replica, which drops the user's entries; the cache is emptied whenever
    the listener is lost or reconnects. An entry lives at most `max_age`
    seconds and never past its token's expiry. A `generation` bump on every
    invalidation keeps a lookup that raced one from caching a stale answer.
    """

    MAX_ENTRIES = 10_000

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self.trusted = False
        self.generation = 0
        # token hash -> (user, token expiry, entry expiry), monotonic times.
        self._entries: dict[bytes, tuple[User, float, float]] = {}

    def get(self, token_hash: bytes) -> tuple[User, float] | None:
        """The user and the token's expiry (monotonic), if cached."""
        if not self.trusted:
            return None
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        user, expires, stale = entry
        # Both bounds hold at their instant: a token expiring now is gone now.
        if time.monotonic() >= min(expires, stale):
            del self._entries[token_hash]
            return None
        return user, expires

    def put(self, token_hash: bytes, user: User, expires: float, generation: int) -> None:
        if not self.trusted or generation != self.generation or self.max_age <= 0:
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
        self._entries[token_hash] = (user, expires, time.monotonic() + self.max_age)

    def forget_user(self, user_id: UUID) -> None:
        self.generation += 1
        for key in [k for k, (u, _, _) in self._entries.items() if u.id == user_id]:
            del self._entries[key]

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()


class StreamGuard:
    """Keeps one long-lived stream honest about its caller.

    A stream is authorized once, when it opens; this re-checks the token
    whenever it may have stopped working: a change to the user (NOTIFY from
    any replica, or this server's own change), the token's expiry instant,
    and, while the invalidation listener is down, once a second. The stream
    (EventHub.watch) calls `check` when `attention` is set; `wake` gets it
    out of its wait to do so.
    """

    def __init__(self, authenticator: Authenticator, caller: Caller, wake: Callable[[], None]):
        self.authenticator = authenticator
        self.user = caller.require_user()
        self.token_hash = caller.token_hash
        self.deadline = caller.deadline
        self.wake = wake
        self.attention = False
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    def poke(self) -> None:
        self.attention = True
        self.wake()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.deadline is not None:
            delay = max(0.0, self.deadline - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self.poke)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def check(self) -> None:
        """Return if the caller may go on; raise to end the stream."""
        self.attention = False
        if self.token_hash is None:
            raise Unauthenticated()
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise Unauthenticated(detail="the token expired")
        resolved = await self.authenticator.resolve(self.token_hash)
        if resolved is None:
            raise Unauthenticated(detail="the token is invalid, expired or revoked")
        user, self.deadline = resolved
        if user.role is not self.user.role:
            # The stream's filter was authorized for the old role.
            raise PermissionDenied(detail="the caller's role changed; open the stream again")
        self._arm()


class Authenticator:
    # The invalidation listener proves itself with a round trip every
    # PING_SECONDS; the cache is trusted only within TRUST_SECONDS of the
    # start of the last one that succeeded. So a silently dead listener
    # delays a revocation by at most TRUST_SECONDS.
    PING_SECONDS = 0.5
    PING_TIMEOUT = 1.0
    TRUST_SECONDS = 2.0
    # While untrusted, open streams re-check their tokens this often.
    RECHECK_SECONDS = 1.0
    MAX_BACKOFF = 5.0

    def __init__(self, db: Database, config: Config) -> None:
        self.db = db
        self.config = config
        self.cache = TokenCache(config.token_cache_seconds)
        self._follower: asyncio.Task[None] | None = None
        self._rechecker: asyncio.Task[None] | None = None
        self._listener = KeptListener(
            db.dsn,
            AUTH_CHANNEL,
            self._on_change,
            application_name="booking-auth-listener",
            ping_every=self.PING_SECONDS,
            ping_timeout=self.PING_TIMEOUT,
            connect_within=self.PING_TIMEOUT * 5,
            retry_after=self.PING_SECONDS,
            max_backoff=self.MAX_BACKOFF,
            on_lost=self._lost,
            on_unreachable=lambda exc: log.warning(
                "cannot LISTEN for auth changes; not caching tokens"
            ),
            on_confirmed=self._confirm,
        )
        self._guards: dict[UUID, set[StreamGuard]] = {}

    async def start(self) -> None:
        # Also without a cache: open streams learn of revocations from it.
        self._follower = asyncio.create_task(self._listener.run(), name="auth-invalidations")
        self._rechecker = asyncio.create_task(self._recheck(), name="auth-stream-recheck")

    async def stop(self) -> None:
        self.cache.trusted = False
        for task in (self._follower, self._rechecker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._follower = self._rechecker = None
        await self._listener.close()

    @property
    def listening(self) -> bool:
        """Whether every invalidation up to about now has reached us."""
        return (
            self._listener.alive
            and time.monotonic() - self._listener.confirmed < self.TRUST_SECONDS
        )

    def _confirm(self, started: float) -> None:
        # Every invalidation committed before `started` has reached us.
        self.cache.trusted = True

    def _on_change(self, payload: str) -> None:
        try:
            user_id = UUID(payload)
        except ValueError:
            self._lost()
            return
        self.forget_user(user_id)

    def _lost(self) -> None:
        """Invalidations may have been missed: trust nothing remembered."""
        self.cache.trusted = False
        self.cache.clear()
        self._poke(g for guards in self._guards.values() for g in guards)

    def _poke(self, guards: Iterable[StreamGuard]) -> None:
        # One wake per hub, however many of its streams are concerned.
        wakes: set[Callable[[], None]] = set()
        for guard in guards:
            guard.attention = True
            wakes.add(guard.wake)
        for wake in wakes:
            wake()

    async def _recheck(self) -> None:
        while True:
            await asyncio.sleep(self.RECHECK_SECONDS)
            if self._guards and not self.listening:
                self._poke(g for guards in self._guards.values() for g in guards)

    def forget_user(self, user_id: UUID) -> None:
        """Drop this server's cached tokens of `user_id` (others get NOTIFY),
        and have the user's open streams re-check theirs."""
        self.cache.forget_user(user_id)
        self._poke(self._guards.get(user_id, ()))

    @contextlib.contextmanager
    def guard(self, caller: Caller, wake: Callable[[], None]) -> Iterator[StreamGuard]:
        """A StreamGuard for a stream `caller` opens, registered while it runs."""
        guard = StreamGuard(self, caller, wake)
        guards = self._guards.setdefault(guard.user.id, set())
        guards.add(guard)
        try:
            yield guard
        finally:
            guard.close()
            guards.discard(guard)
            if not guards and self._guards.get(guard.user.id) is guards:
                del self._guards[guard.user.id]

    async def resolve(self, token_hash: bytes) -> tuple[User, float] | None:
        """The token's user and its expiry (monotonic), if it works now."""
        # Checked on every use, not only by _follow: a listener that just
        # died, or went quiet, may have missed an invalidation.
        self.cache.trusted = self.listening
        cached = self.cache.get(token_hash)
        if cached is not None:
            return cached
        generation = self.cache.generation
        found = await auth_store.resolve_token(self.db, token_hash)
        if found is None:
            return None
        user, remaining = found
        expires = time.monotonic() + remaining
        self.cache.put(token_hash, user, expires, generation)
        return user, expires

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
        resolved = await self.resolve(token_hash)
        if resolved is None:
            if policy.anonymous:
                # A stale token must not stop anyone logging in again: where
                # anonymous calls are allowed, a bad token only adds nothing.
                return ANONYMOUS
            raise Unauthenticated(detail="the token is invalid, expired or revoked")
        user, deadline = resolved
        caller = Caller(user, token_hash, deadline)
        if user.role not in policy.roles and not policy.anonymous:
            raise PermissionDenied(method=method)
        return caller

    async def login(self, email: str, password: str) -> tuple[str, datetime, User]:
        """A new token for valid credentials.

        Unknown email and wrong password fail the same way after the same
        work; attempts are counted per account key (known or not) and lock
        it out.
        """
        email = email.strip()
        # The attempt is taken before the password is checked, in one
        # statement, so concurrent attempts cannot all pass a check and only
        # then be counted. Keyed like the accounts (booking_email_key).
        remaining = await auth_store.take_attempt(
            self.db,
            email,
            max_failures=self.config.login_max_failures,
            window=timedelta(seconds=self.config.login_lockout_seconds),
        )
        if remaining > 0:
            raise LoginThrottled(retry_after_seconds=max(1, math.ceil(remaining)))
        found = await user_store.credentials(self.db, email)
        stored = found[1] if found else None
        ok = await passwords.verify(stored, password)
        if not ok or found is None or not found[0].active:
            # The attempt stays counted.
            raise InvalidCredentials()
        user, stored_hash = found
        await auth_store.clear_failures(self.db, email)
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
