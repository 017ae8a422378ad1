"""Authentication: opaque bearer tokens, login, and the caller of an RPC.

Tokens are random 256-bit strings; only their SHA-256 is stored, and every
RPC looks the digest up together with the user's is_active flag, so
deactivating a user or logging out takes effect on the very next call
(docs/auth.md explains the choice over JWTs).
"""

from __future__ import annotations

import contextvars
import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from service import passwords
from service.config import Config
from service.errors import PermissionDenied, Unauthenticated
from service.policy import OPEN_PREFIXES, POLICIES
from storage import auth as auth_store
from storage import users as user_store
from storage.database import Database
from storage.errors import InvalidCredentials, LoginThrottled
from storage.models import Role, User

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


class Authenticator:
    def __init__(self, db: Database, config: Config) -> None:
        self.db = db
        self.config = config

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
        user = await auth_store.resolve_token(self.db, token_hash)
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
