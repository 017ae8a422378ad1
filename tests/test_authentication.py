"""Authentication: login, tokens, throttling, password rules and storage,
and self sign-up."""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import argon2
import asyncpg
import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from booking.v1 import auth_pb2
from booking.v1 import specialist_pb2 as sppb
from booking.v1 import user_pb2 as upb
from service import passwords
from service.config import Config
from service.logs import JsonFormatter
from service.server import BookingServer
from storage import users as user_store
from storage.models import Role
from tests.support import (
    PASSWORD,
    Api,
    RpcFailure,
    ServerConfig,
    expect_failure,
    failure,
    running_server,
)

UNAUTH = grpc.StatusCode.UNAUTHENTICATED

# OWASP's floor for argon2id: 19 MiB, 2 passes, 1 lane.
MIN_MEMORY_KIB = 19456
MIN_TIME_COST = 2
MIN_PARALLELISM = 1


def _email(tag: str = "user") -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}@example.com"


def _comparable(got: RpcFailure) -> tuple[Any, ...]:
    return got.code, got.message, got.reason, got.metadata, got.violations


async def _login_failure(api: Api, email: str, password: str) -> RpcFailure:
    async with expect_failure(UNAUTH, "INVALID_CREDENTIALS") as box:
        await api.auth.Login(auth_pb2.LoginRequest(email=email, password=password))
    return box[0]


async def _sign_up(api: Api, email: str, password: str, **kw: Any) -> upb.User:
    """Anonymous CreateUser (self sign-up)."""
    reply = await api.users.CreateUser(upb.CreateUserRequest(email=email, password=password, **kw))
    return reply.user


async def _stored_hash(database_url: str, user_id: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        value: str = await conn.fetchval(
            "SELECT password_hash FROM users WHERE id = $1", uuid.UUID(user_id)
        )
    finally:
        await conn.close()
    return value


def _assert_strong(stored: str) -> None:
    assert stored.startswith("$argon2id$"), stored
    params = argon2.extract_parameters(stored)
    assert params.type is argon2.Type.ID
    assert params.memory_cost >= MIN_MEMORY_KIB, params
    assert params.time_cost >= MIN_TIME_COST, params
    assert params.parallelism >= MIN_PARALLELISM, params


async def _deactivate(api: Api, user_id: str) -> upb.User:
    reply = await api.users.UpdateUser(
        upb.UpdateUserRequest(
            user=upb.User(id=user_id, active=False), update_mask=FieldMask(paths=["active"])
        ),
        metadata=api.md,
    )
    return reply.user


# ---------------------------------------------------------------------------
# Login.
# ---------------------------------------------------------------------------


async def test_login_returns_a_working_token_and_its_expiry(
    api: Api, server: BookingServer
) -> None:
    user_id, email = await api.make_user(Role.CLIENT)
    before = datetime.now(UTC)
    reply = await api.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
    assert len(reply.access_token) >= 32
    assert PASSWORD not in reply.access_token
    assert reply.user.id == user_id
    assert reply.user.email == email
    ttl = timedelta(seconds=server.config.token_ttl_seconds)
    expires = reply.expire_time.ToDatetime(tzinfo=UTC)
    assert before + ttl - timedelta(seconds=60) <= expires <= before + ttl + timedelta(seconds=60)
    me = await api.as_(reply.access_token).user_id()
    assert me == user_id


async def test_wrong_password_and_unknown_email_fail_identically(api: Api) -> None:
    _, email = await api.make_user(Role.CLIENT)
    wrong_password = await _login_failure(api, email, "not the password")
    unknown_email = await _login_failure(api, _email("nobody"), PASSWORD)
    assert _comparable(wrong_password) == _comparable(unknown_email)


class _CountingHasher:
    """Wraps the service's PasswordHasher and records every verify."""

    def __init__(self, inner: argon2.PasswordHasher) -> None:
        self.inner = inner
        self.verified: list[str] = []

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verified.append(hash if isinstance(hash, str) else hash.decode())
        return self.inner.verify(hash, password)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_an_unknown_email_still_costs_a_full_argon2_verify(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, email = await api.make_user(Role.CLIENT)
    counting = _CountingHasher(passwords.HASHER)
    monkeypatch.setattr(passwords, "HASHER", counting)

    await _login_failure(api, email, "not the password")
    assert len(counting.verified) == 1

    await _login_failure(api, _email("nobody"), PASSWORD)
    assert len(counting.verified) == 2, "the unknown-email path skipped the argon2 verify"
    # ...against a hash as expensive as a real one.
    dummy = argon2.extract_parameters(counting.verified[1])
    real = argon2.extract_parameters(counting.verified[0])
    assert (dummy.type, dummy.memory_cost, dummy.time_cost, dummy.parallelism) == (
        real.type,
        real.memory_cost,
        real.time_cost,
        real.parallelism,
    )


async def test_repeated_failures_throttle_the_account(api: Api, server: BookingServer) -> None:
    assert server.config.login_max_failures == 5  # the default
    _, email = await api.make_user(Role.CLIENT)
    for _ in range(5):
        await _login_failure(api, email, "not the password")
    # Even the right password is refused now, whatever the email's case.
    for attempt in (email, email.upper()):
        async with expect_failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "LOGIN_THROTTLED") as box:
            await api.login(attempt)
        assert int(box[0].metadata["retry_after_seconds"]) > 0
    # Other accounts are unaffected.
    _, bystander = await api.make_user(Role.CLIENT)
    assert await api.login(bystander)


async def test_concurrent_attempts_cannot_outrun_the_throttle(
    api: Api, server: BookingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = server.config.login_max_failures
    _, email = await api.make_user(Role.CLIENT)
    counting = _CountingHasher(passwords.HASHER)
    monkeypatch.setattr(passwords, "HASHER", counting)
    attempts = 40
    right = attempts - 1  # sent last: the likeliest to be throttled

    async def attempt(i: int) -> str:
        password = PASSWORD if i == right else f"wrong password {i}"
        try:
            await api.auth.Login(auth_pb2.LoginRequest(email=email, password=password))
        except grpc.aio.AioRpcError as err:
            return failure(err).reason
        return "OK"

    outcomes = await asyncio.gather(*(attempt(i) for i in range(attempts)))
    evaluated = len(counting.verified)
    assert 1 <= evaluated <= limit, f"{evaluated} passwords were checked, the limit is {limit}"
    throttled = outcomes.count("LOGIN_THROTTLED")
    assert throttled == attempts - evaluated
    assert outcomes.count("INVALID_CREDENTIALS") + outcomes.count("OK") == evaluated
    if outcomes[right] != "OK":
        # The right password came too late: the account stays locked.
        async with expect_failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "LOGIN_THROTTLED"):
            await api.login(email)
        assert len(counting.verified) == evaluated


async def test_repeated_failures_throttle_an_unknown_email_too(api: Api) -> None:
    email = _email("nobody")
    for _ in range(5):
        await _login_failure(api, email, PASSWORD)
    async with expect_failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "LOGIN_THROTTLED"):
        await api.login(email)


async def test_an_inactive_user_cannot_log_in(api: Api) -> None:
    user_id, email = await api.make_user(Role.CLIENT)
    await _deactivate(api, user_id)
    inactive = await _login_failure(api, email, PASSWORD)
    wrong = await _login_failure(api, _email("nobody"), PASSWORD)
    assert _comparable(inactive) == _comparable(wrong), "login must not reveal deactivation"


# ---------------------------------------------------------------------------
# Tokens.
# ---------------------------------------------------------------------------


async def test_deactivating_a_user_kills_its_token_on_the_very_next_call(api: Api) -> None:
    client, client_id = await api.client()
    assert await client.user_id() == client_id
    assert not (await _deactivate(api, client_id)).active
    async with expect_failure(UNAUTH, "UNAUTHENTICATED"):
        await client.auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=client.md)
    async with expect_failure(UNAUTH, "UNAUTHENTICATED"):
        await client.specialists.ListSpecialists(sppb.ListSpecialistsRequest(), metadata=client.md)


async def test_logout_revokes_only_the_token_it_was_called_with(api: Api) -> None:
    user_id, email = await api.make_user(Role.CLIENT)
    first = api.as_(await api.login(email))
    second = api.as_(await api.login(email))
    await first.auth.Logout(auth_pb2.LogoutRequest(), metadata=first.md)
    async with expect_failure(UNAUTH, "UNAUTHENTICATED"):
        await first.auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=first.md)
    async with expect_failure(UNAUTH, "UNAUTHENTICATED"):
        await first.auth.Logout(auth_pb2.LogoutRequest(), metadata=first.md)
    assert await second.user_id() == user_id


async def test_who_am_i_returns_the_caller(api: Api) -> None:
    wire = {
        Role.CLIENT: upb.USER_ROLE_CLIENT,
        Role.OPERATOR: upb.USER_ROLE_OPERATOR,
        Role.ADMIN: upb.USER_ROLE_ADMIN,
    }
    for role, wire_role in wire.items():
        user_id, email = await api.make_user(role)
        caller = api.as_(await api.login(email))
        reply = await caller.auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=caller.md)
        assert (reply.user.id, reply.user.email, reply.user.role, reply.user.active) == (
            user_id,
            email,
            wire_role,
            True,
        )


# ---------------------------------------------------------------------------
# Passwords.
# ---------------------------------------------------------------------------


async def test_passwords_must_be_8_to_128_characters_and_are_never_truncated(api: Api) -> None:
    anon = api.as_(None)
    for bad in ("x" * 7, "y" * 129, ""):
        async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT) as box:
            await _sign_up(anon, _email(), bad)
        assert "password" in box[0].violations

    assert (await _sign_up(anon, _email(), "z" * 8)).id

    longest = secrets.token_urlsafe(96)[:128]
    assert len(longest) == 128
    email = _email("long")
    user = await _sign_up(anon, email, longest)
    assert await api.login(email, longest)
    await _login_failure(api, email, longest[:127])
    await _login_failure(api, email, longest + "x")

    # The same rule when a user changes its own password.
    owner = api.as_(await api.login(email, longest))
    for bad in ("x" * 7, "y" * 129):
        async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT) as box:
            await owner.users.UpdateUser(
                upb.UpdateUserRequest(
                    user=upb.User(id=user.id),
                    update_mask=FieldMask(paths=["password"]),
                    password=bad,
                ),
                metadata=owner.md,
            )
        assert "password" in box[0].violations


async def test_passwords_are_stored_as_argon2id_at_owasp_strength(
    api: Api, database_url: str
) -> None:
    email = _email()
    user = await _sign_up(api.as_(None), email, PASSWORD)
    stored = await _stored_hash(database_url, user.id)
    _assert_strong(stored)
    assert PASSWORD not in stored

    # A changed password too.
    owner = api.as_(await api.login(email))
    await owner.users.UpdateUser(
        upb.UpdateUserRequest(
            user=upb.User(id=user.id),
            update_mask=FieldMask(paths=["password"]),
            password="another fine password",
        ),
        metadata=owner.md,
    )
    changed = await _stored_hash(database_url, user.id)
    assert changed != stored
    _assert_strong(changed)


async def test_a_weak_old_hash_is_upgraded_on_the_next_login(
    api: Api, server: BookingServer, database_url: str
) -> None:
    assert server.db is not None
    weak = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
    email = _email("legacy")
    user = await user_store.create(server.db, email=email, password_hash=weak, role=Role.CLIENT)
    assert await _stored_hash(database_url, str(user.id)) == weak

    assert await api.login(email)
    upgraded = await _stored_hash(database_url, str(user.id))
    assert upgraded != weak
    _assert_strong(upgraded)
    assert argon2.PasswordHasher().verify(upgraded, PASSWORD)
    assert await api.login(email)  # and the new hash works


async def test_passwords_never_reach_the_logs(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    canary = "Canary-" + secrets.token_hex(12)
    wrong = "Wrong-" + secrets.token_hex(12)
    changed = "Changed-" + secrets.token_hex(12)
    taken = "Taken-" + secrets.token_hex(12)
    email = _email("logs")
    anon = api.as_(None)

    user = await _sign_up(anon, email, canary)
    async with expect_failure(grpc.StatusCode.ALREADY_EXISTS):
        await _sign_up(anon, email, taken)
    await _login_failure(api, email, wrong)
    owner = api.as_(await api.login(email, canary))
    await owner.users.UpdateUser(
        upb.UpdateUserRequest(
            user=upb.User(id=user.id), update_mask=FieldMask(paths=["password"]), password=changed
        ),
        metadata=owner.md,
    )
    await api.login(email, changed)

    rpc_lines = [r.getMessage() for r in caplog.records if r.name == "booking.rpc"]
    assert any("CreateUser" in line for line in rpc_lines), "the RPC log was not captured"
    assert any("Login" in line for line in rpc_lines), "the RPC log was not captured"
    formatter = JsonFormatter()
    everything = caplog.text + "\n".join(formatter.format(r) for r in caplog.records)
    for secret in (canary, wrong, changed, taken):
        assert secret not in everything


# ---------------------------------------------------------------------------
# Self sign-up.
# ---------------------------------------------------------------------------


async def test_self_sign_up_creates_a_client_that_can_log_in(api: Api) -> None:
    assert Config().allow_self_signup is True
    email = _email("signup")
    user = await _sign_up(api.as_(None), email, PASSWORD)
    assert user.role == upb.USER_ROLE_CLIENT
    assert user.active
    explicit = await _sign_up(api.as_(None), _email("signup"), PASSWORD, role=upb.USER_ROLE_CLIENT)
    assert explicit.role == upb.USER_ROLE_CLIENT
    assert await api.login(email)


async def test_self_sign_up_cannot_create_staff(api: Api) -> None:
    anon = api.as_(None)
    for role in (upb.USER_ROLE_OPERATOR, upb.USER_ROLE_ADMIN):
        email = _email("climber")
        async with expect_failure(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"):
            await _sign_up(anon, email, PASSWORD, role=role)
        # Nothing was created: the email is still free.
        created = await api.users.CreateUser(
            upb.CreateUserRequest(email=email, password=PASSWORD, role=role), metadata=api.md
        )
        assert created.user.role == role


@pytest.fixture
async def no_signup_server(database_url: str) -> AsyncIterator[BookingServer]:
    async with running_server(database_url, allow_self_signup=False) as srv:
        yield srv


async def test_self_sign_up_can_be_disabled(no_signup_server: BookingServer) -> None:
    async with Api.connect(no_signup_server) as admin:
        email = _email("signup")
        async with expect_failure(UNAUTH, "UNAUTHENTICATED"):
            await _sign_up(admin.as_(None), email, PASSWORD)
        # Nor may a logged-in CLIENT sign someone up.
        client, _ = await admin.client()
        async with expect_failure(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"):
            await client.users.CreateUser(
                upb.CreateUserRequest(email=email, password=PASSWORD), metadata=client.md
            )
        # Staff still register clients.
        operator = admin.as_(await admin.make_token(Role.OPERATOR))
        for staff in (operator, admin):
            created = await staff.users.CreateUser(
                upb.CreateUserRequest(email=_email("desk"), password=PASSWORD), metadata=staff.md
            )
            assert created.user.role == upb.USER_ROLE_CLIENT


async def test_anonymous_sign_ups_are_rate_limited_per_address(database_url: str) -> None:
    # Each sign-up tells whether an email is registered and costs an argon2
    # hash: one address gets a few per minute.
    async with running_server(database_url, signups_per_minute=3) as srv:
        async with Api.connect(srv) as admin:
            anon = admin.as_(None)
            taken = _email("taken")
            await _sign_up(anon, taken, PASSWORD)
            async with expect_failure(grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN"):
                await _sign_up(anon, taken, PASSWORD)
            await _sign_up(anon, _email("signup"), PASSWORD)
            for email in (taken, _email("signup")):
                async with expect_failure(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "SIGNUP_THROTTLED"
                ) as box:
                    await _sign_up(anon, email, PASSWORD)
                assert int(box[0].metadata["retry_after_seconds"]) > 0
            # Staff registering clients are not anonymous, nor limited.
            for _ in range(4):
                created = await admin.users.CreateUser(
                    upb.CreateUserRequest(email=_email("desk"), password=PASSWORD),
                    metadata=admin.md,
                )
                assert created.user.id


async def test_deactivation_through_one_replica_stops_the_token_on_another_at_once(
    database_url: str,
) -> None:
    config = ServerConfig.for_tests(database_url)
    one, two = BookingServer(config), BookingServer(config)
    await one.start()
    await two.start()
    try:
        async with Api.connect(one) as admin_one, Api.connect(two) as admin_two:
            user_id, email = await admin_one.make_user(Role.CLIENT)
            token = await admin_one.login(email)
            on_two = admin_two.as_(token)
            # Warm replica two's token cache.
            for _ in range(3):
                await on_two.auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=on_two.md)
            await admin_one.users.UpdateUser(
                upb.UpdateUserRequest(
                    user=upb.User(id=user_id, active=False),
                    update_mask=FieldMask(paths=["active"]),
                ),
                metadata=admin_one.md,
            )
            # NOTIFY crosses replicas within milliseconds; allow a little
            # scheduling slack, far below the cache's 30 s lifetime.
            for _ in range(200):
                try:
                    await on_two.auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=on_two.md)
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("replica two still accepts the deactivated user's token")
    finally:
        await one.stop(grace=1)
        await two.stop(grace=1)


async def test_cached_tokens_are_not_trusted_once_the_invalidation_listener_is_lost(
    api: Api, database_url: str
) -> None:
    user_id, email = await api.make_user(Role.CLIENT)
    client = api.as_(await api.login(email))
    for _ in range(3):  # cached now
        await client.auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=client.md)
    conn = await asyncpg.connect(database_url)
    try:
        # Cut the server's LISTEN connections, then deactivate behind its
        # back: the notification goes nowhere.
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name LIKE 'booking-%listener' AND datname = current_database()"
        )
        await conn.execute("UPDATE users SET is_active = false WHERE id = $1", uuid.UUID(user_id))
    finally:
        await conn.close()
    for _ in range(200):
        try:
            await client.auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=client.md)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("a token cached before the listener died outlived its user")
