"""UserService end to end over a real gRPC channel and a real PostgreSQL:
success paths, NOT_FOUND, ALREADY_EXISTS (case-insensitive emails), filters
and pagination. Login, WhoAmI, Logout and password rules are in
test_authentication.py; malformed requests in test_invalid_input.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from booking.v1 import user_pb2 as upb
from storage import users as user_store
from storage.models import Role
from tests.support import PASSWORD, Api, expect_failure

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXISTS = grpc.StatusCode.ALREADY_EXISTS
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
MISSING_ID = "00000000-0000-4000-8000-000000000000"


def _email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


async def _create(
    api: Api, email: str | None = None, role: Any = 0, password: str = PASSWORD
) -> upb.User:
    reply = await api.users.CreateUser(
        upb.CreateUserRequest(
            email=_email() if email is None else email, password=password, role=role
        ),
        metadata=api.md,
    )
    return reply.user


async def _get(api: Api, user_id: str) -> upb.User:
    return (await api.users.GetUser(upb.GetUserRequest(id=user_id), metadata=api.md)).user


async def _update(
    api: Api, user: upb.User, paths: list[str], password: str = ""
) -> upb.UpdateUserResponse:
    return await api.users.UpdateUser(
        upb.UpdateUserRequest(user=user, update_mask=FieldMask(paths=paths), password=password),
        metadata=api.md,
    )


async def _list(api: Api, **kw: Any) -> upb.ListUsersResponse:
    return await api.users.ListUsers(upb.ListUsersRequest(**kw), metadata=api.md)


async def _seed(api: Api, n: int, role: Role = Role.CLIENT) -> list[str]:
    """n users written straight to storage (no argon2: ListUsers is under test)."""
    assert api.server.db is not None
    ids = []
    for i in range(n):
        user = await user_store.create(
            api.server.db, email=_email(f"seed{i}"), password_hash="unused", role=role
        )
        ids.append(str(user.id))
    return ids


async def _walk(api: Api, page_size: int, **filters: Any) -> tuple[list[upb.User], int]:
    items: list[upb.User] = []
    token, pages = "", 0
    while True:
        page = await _list(api, page_size=page_size, page_token=token, **filters)
        pages += 1
        assert len(page.users) <= page_size
        items.extend(page.users)
        token = page.next_page_token
        if not token:
            return items, pages
        assert pages < 100, "pagination does not terminate"


def _ids(users: Iterable[Any]) -> list[str]:
    return [u.id for u in users]


# --- success paths ---------------------------------------------------------


async def test_create_user_returns_the_stored_user_and_get_user_reads_it_back(api: Api) -> None:
    user = await _create(api, "New.Person@Example.com", role=upb.USER_ROLE_OPERATOR)
    assert uuid.UUID(user.id)
    assert user.email == "New.Person@Example.com"
    assert user.role == upb.USER_ROLE_OPERATOR
    assert user.active is True
    assert user.HasField("create_time") and user.HasField("update_time")
    assert await _get(api, user.id) == user


async def test_create_user_defaults_the_role_to_client_and_trims_the_email(api: Api) -> None:
    email = _email()
    user = await _create(api, f"  {email}  ")
    assert user.role == upb.USER_ROLE_CLIENT
    assert user.email == email


async def test_update_user_changes_only_the_masked_fields(api: Api) -> None:
    user = await _create(api)
    new_email = _email("renamed")
    patch = upb.User(id=user.id, email=new_email, role=upb.USER_ROLE_ADMIN, active=False)
    updated = (await _update(api, patch, ["email"])).user
    assert updated.email == new_email
    assert updated.role == upb.USER_ROLE_CLIENT
    assert updated.active is True
    assert (updated.update_time.seconds, updated.update_time.nanos) > (
        user.update_time.seconds,
        user.update_time.nanos,
    )
    assert await _get(api, user.id) == updated


async def test_update_user_changes_role_and_active(api: Api) -> None:
    user = await _create(api)
    patch = upb.User(id=user.id, role=upb.USER_ROLE_OPERATOR, active=False)
    updated = (await _update(api, patch, ["role", "active"])).user
    assert (updated.role, updated.active, updated.email) == (
        upb.USER_ROLE_OPERATOR,
        False,
        user.email,
    )
    assert await _get(api, user.id) == updated


async def test_update_user_password_replaces_the_old_one(api: Api) -> None:
    email = _email()
    user = await _create(api, email)
    await _update(api, upb.User(id=user.id), ["password"], password="a brand new secret")
    async with expect_failure(UNAUTHENTICATED):
        await api.login(email)
    assert await api.login(email, "a brand new secret")


async def test_a_user_may_change_the_case_of_its_own_email(api: Api) -> None:
    user = await _create(api, "carol@example.com")
    updated = (await _update(api, upb.User(id=user.id, email="Carol@Example.com"), ["email"])).user
    assert updated.email == "Carol@Example.com"


async def test_list_users_filters_by_role_and_active(api: Api) -> None:
    op1 = await _create(api, role=upb.USER_ROLE_OPERATOR)
    op2 = await _create(api, role=upb.USER_ROLE_OPERATOR)
    client = await _create(api)
    await _update(api, upb.User(id=op2.id, active=False), ["active"])

    operators = await _list(api, role=upb.USER_ROLE_OPERATOR)
    assert _ids(operators.users) == [op1.id, op2.id]
    inactive = await _list(api, active=False)
    assert _ids(inactive.users) == [op2.id]
    active_ops = await _list(api, role=upb.USER_ROLE_OPERATOR, active=True)
    assert _ids(active_ops.users) == [op1.id]
    clients = await _list(api, role=upb.USER_ROLE_CLIENT)
    assert _ids(clients.users) == [client.id]
    everyone = await _list(api)
    assert {op1.id, op2.id, client.id} <= set(_ids(everyone.users))


# --- ALREADY_EXISTS --------------------------------------------------------


async def test_duplicate_email_is_already_exists(api: Api) -> None:
    email = _email()
    first = await _create(api, email)
    async with expect_failure(EXISTS, "EMAIL_TAKEN"):
        await _create(api, email, role=upb.USER_ROLE_OPERATOR)
    listed = await _list(api, role=upb.USER_ROLE_OPERATOR)
    assert listed.users == []
    assert (await _get(api, first.id)).role == upb.USER_ROLE_CLIENT


async def test_duplicate_email_differing_only_in_case_is_already_exists(api: Api) -> None:
    await _create(api, "Alice@Example.com")
    for twin in ["alice@example.com", "ALICE@EXAMPLE.COM", "  aLiCe@example.COM "]:
        async with expect_failure(EXISTS, "EMAIL_TAKEN"):
            await _create(api, twin)
    assert len((await _list(api, role=upb.USER_ROLE_CLIENT)).users) == 1


async def test_changing_email_to_a_taken_one_is_already_exists_and_changes_nothing(
    api: Api,
) -> None:
    await _create(api, "alice@example.com")
    bob = await _create(api, "bob@example.com")
    async with expect_failure(EXISTS, "EMAIL_TAKEN"):
        await _update(api, upb.User(id=bob.id, email="ALICE@example.com"), ["email"])
    assert await _get(api, bob.id) == bob


# --- NOT_FOUND -------------------------------------------------------------


async def test_get_or_update_unknown_user_is_not_found(api: Api) -> None:
    async with expect_failure(NOT_FOUND, "USER_NOT_FOUND") as box:
        await _get(api, MISSING_ID)
    assert box[0].metadata.get("id") == MISSING_ID
    async with expect_failure(NOT_FOUND, "USER_NOT_FOUND"):
        await _update(api, upb.User(id=MISSING_ID, email=_email()), ["email"])
    async with expect_failure(NOT_FOUND, "USER_NOT_FOUND"):
        await _update(api, upb.User(id=MISSING_ID, active=False), ["active"])


# --- pagination ------------------------------------------------------------


async def test_list_users_page_size_zero_means_fifty(api: Api) -> None:
    await _seed(api, 55)
    first = await _list(api, page_size=0)
    assert len(first.users) == 50
    assert first.next_page_token
    rest = await _list(api, page_token=first.next_page_token)
    assert len(rest.users) == 6  # 55 seeded + the admin
    assert rest.next_page_token == ""
    big = await _list(api, page_size=2**31 - 1)
    assert len(big.users) == 56 and big.next_page_token == ""


async def test_walking_user_pages_returns_every_user_once_in_creation_order(api: Api) -> None:
    await _seed(api, 6, Role.CLIENT)
    await _seed(api, 5, Role.OPERATOR)
    everyone = (await _list(api, page_size=1000)).users
    assert len(everyone) == 12
    ordered = sorted(
        everyone, key=lambda u: (u.create_time.seconds, u.create_time.nanos, uuid.UUID(u.id))
    )
    assert _ids(everyone) == _ids(ordered)
    for size in (1, 5, 12):
        walked, pages = await _walk(api, size)
        assert _ids(walked) == _ids(everyone), f"page_size={size}"
        assert pages == -(-12 // size)
    operators, _ = await _walk(api, 2, role=upb.USER_ROLE_OPERATOR)
    assert _ids(operators) == [u.id for u in everyone if u.role == upb.USER_ROLE_OPERATOR]


async def test_user_page_token_reused_with_changed_filters_is_invalid_argument(api: Api) -> None:
    await _seed(api, 3)
    first = await _list(api, page_size=1, role=upb.USER_ROLE_CLIENT)
    assert first.next_page_token
    changed: list[dict[str, Any]] = [
        {"role": upb.USER_ROLE_OPERATOR},
        {},
        {"role": upb.USER_ROLE_CLIENT, "active": True},
    ]
    for filters in changed:
        async with expect_failure(INVALID) as box:
            await _list(api, page_size=1, page_token=first.next_page_token, **filters)
        assert box[0].violations == ["page_token"], filters
    second = await _list(api, page_size=1, page_token=first.next_page_token, role=1)
    assert _ids(second.users) != _ids(first.users)
