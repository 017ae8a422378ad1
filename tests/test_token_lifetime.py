"""A token stops working the moment it should: at its expiry, when revoked
(open streams included), and when this server may have missed the news
because its invalidation listener went quiet. Two replicas share one
database where it matters."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg
import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from booking.v1 import appointment_pb2 as apb
from booking.v1 import auth_pb2
from booking.v1 import user_pb2 as upb
from service import auth
from service.server import BookingServer
from storage.models import Role
from tests.support import PASSWORD, Api, ServerConfig, expect_failure, failure

UNAUTH = grpc.StatusCode.UNAUTHENTICATED


@asynccontextmanager
async def _replicas(database_url: str, **overrides: object) -> AsyncIterator[list[BookingServer]]:
    config = ServerConfig.for_tests(database_url, **overrides)
    servers = [BookingServer(config), BookingServer(config)]
    try:
        for srv in servers:
            await srv.start()
        yield servers
    finally:
        for srv in servers:
            await srv.stop(grace=1)


def _authenticator(srv: BookingServer) -> auth.Authenticator:
    authenticator = srv._authenticator
    assert authenticator is not None
    return authenticator


async def _until(predicate: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


async def _listening(*servers: BookingServer) -> None:
    authenticators = [_authenticator(srv) for srv in servers]
    await _until(lambda: all(a.listening for a in authenticators), "the auth listeners are up")


async def _who_am_i(api: Api) -> str:
    reply = await api.auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=api.md)
    return reply.user.id


async def _cached(caller: Api, srv: BookingServer, token: str, user_id: str) -> None:
    """Use the token until `srv` answers for it from its cache."""
    cache = _authenticator(srv).cache
    for _ in range(100):
        assert await _who_am_i(caller) == user_id
        if cache.get(auth.digest(token)) is not None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the token never made it into the cache")


# ---------------------------------------------------------------------------
# Expiry.
# ---------------------------------------------------------------------------


async def test_a_cached_token_stops_at_its_expiry_on_every_replica(database_url: str) -> None:
    # The cache would trust a lookup for 30 s; the token lives 4.
    async with (
        _replicas(database_url, token_ttl_seconds=4, token_cache_seconds=30.0) as (one, two),
        Api.connect(one) as on_one,
        Api.connect(two) as on_two,
    ):
        await _listening(one, two)
        user_id, email = await on_one.make_user(Role.CLIENT)
        reply = await on_one.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
        expires = reply.expire_time.ToDatetime(tzinfo=UTC)
        token = reply.access_token
        callers = [on_one.as_(token), on_two.as_(token)]
        for caller, srv in zip(callers, (one, two), strict=True):
            await _cached(caller, srv, token, user_id)

        wait = (expires - datetime.now(UTC)).total_seconds() + 0.05
        assert 0 < wait < 5
        await asyncio.sleep(wait)
        for caller in callers:
            async with expect_failure(UNAUTH, "UNAUTHENTICATED"):
                await _who_am_i(caller)


# ---------------------------------------------------------------------------
# Open streams.
# ---------------------------------------------------------------------------


Stream = grpc.aio.UnaryStreamCall[
    apb.WatchAppointmentEventsRequest, apb.WatchAppointmentEventsResponse
]


async def _open_stream(api: Api) -> Stream:
    call = api.appointments.WatchAppointmentEvents(
        apb.WatchAppointmentEventsRequest(), metadata=api.md
    )
    first = await call.read()  # the opening heartbeat: the stream is live
    assert isinstance(first, apb.WatchAppointmentEventsResponse)
    assert first.HasField("heartbeat")
    return call


async def _ends_unauthenticated(call: Stream) -> float:
    """Seconds until the stream ends; it must end UNAUTHENTICATED."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(10):
            while True:
                message = await call.read()
                assert isinstance(message, apb.WatchAppointmentEventsResponse), (
                    "the stream ended without an error"
                )
    except grpc.aio.AioRpcError as err:
        got = failure(err)
        assert (got.code, got.reason) == (UNAUTH, "UNAUTHENTICATED"), got
        return time.monotonic() - start
    except TimeoutError:
        call.cancel()
        raise AssertionError("the stream outlived its token") from None
    raise AssertionError("unreachable")


async def _logout(on_revoker: Api, token: str, user_id: str) -> None:
    caller = on_revoker.as_(token)
    await caller.auth.Logout(auth_pb2.LogoutRequest(), metadata=caller.md)


async def _deactivate(on_revoker: Api, token: str, user_id: str) -> None:
    await on_revoker.users.UpdateUser(
        upb.UpdateUserRequest(
            user=upb.User(id=user_id, active=False), update_mask=FieldMask(paths=["active"])
        ),
        metadata=on_revoker.md,
    )


Revoke = Callable[[Api, str, str], Awaitable[None]]


@pytest.mark.parametrize("revoke", [_logout, _deactivate], ids=["logout", "deactivate"])
@pytest.mark.parametrize("through", ["same", "other"])
async def test_revoking_a_token_ends_its_open_stream(
    database_url: str, revoke: Revoke, through: str
) -> None:
    # Heartbeats every 60 s: only the revocation can wake the stream.
    async with (
        _replicas(database_url, heartbeat_seconds=60.0) as (one, two),
        Api.connect(one) as on_one,
        Api.connect(two) as on_two,
    ):
        await _listening(one, two)
        user_id, email = await on_one.make_user(Role.CLIENT)
        token = await on_one.login(email)
        bystander = on_one.as_(await on_one.login(email))  # same user, another token
        stream = await _open_stream(on_one.as_(token))
        other_stream = await _open_stream(bystander)
        await revoke(on_one if through == "same" else on_two, token, user_id)
        took = await _ends_unauthenticated(stream)
        assert took < 5, f"the stream ended {took:.1f}s after the revocation"
        if revoke is _logout:
            # Only the revoked token's stream ends.
            await asyncio.sleep(0.3)
            assert not other_stream.done()
        other_stream.cancel()


async def test_a_role_change_ends_the_stream_its_filter_was_authorized_for(
    database_url: str,
) -> None:
    async with (
        _replicas(database_url, heartbeat_seconds=60.0) as (one, two),
        Api.connect(one) as on_one,
        Api.connect(two) as on_two,
    ):
        await _listening(one, two)
        user_id, email = await on_one.make_user(Role.OPERATOR)
        stream = await _open_stream(on_one.as_(await on_one.login(email)))
        await on_two.users.UpdateUser(
            upb.UpdateUserRequest(
                user=upb.User(id=user_id, role=upb.USER_ROLE_CLIENT),
                update_mask=FieldMask(paths=["role"]),
            ),
            metadata=on_two.md,
        )
        try:
            async with asyncio.timeout(10):
                while True:
                    await stream.read()
        except grpc.aio.AioRpcError as err:
            got = failure(err)
            assert (got.code, got.reason) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "PERMISSION_DENIED",
            )
        else:
            raise AssertionError("unreachable")


async def test_a_stream_ends_when_its_token_expires(database_url: str) -> None:
    async with (
        _replicas(database_url, token_ttl_seconds=3, heartbeat_seconds=60.0) as (one, _),
        Api.connect(one) as api,
    ):
        _, email = await api.make_user(Role.CLIENT)
        reply = await api.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
        expires = reply.expire_time.ToDatetime(tzinfo=UTC)
        stream = await _open_stream(api.as_(reply.access_token))
        await _ends_unauthenticated(stream)
        ended = datetime.now(UTC)
        # The server counts the expiry down from before its lookup, so it may
        # end the stream a lookup's latency early, never late.
        assert (ended - expires).total_seconds() > -0.1, "the stream ended long before expiry"
        assert (ended - expires).total_seconds() < 1, "the stream outlived its token"


# ---------------------------------------------------------------------------
# A listener that stops answering.
# ---------------------------------------------------------------------------


async def test_a_stalled_invalidation_listener_stops_the_cache_being_trusted(
    api: Api, server: BookingServer, database_url: str
) -> None:
    await _listening(server)
    user_id, email = await api.make_user(Role.CLIENT)
    token = await api.login(email)
    client = api.as_(token)
    await _cached(client, server, token, user_id)

    conn = await asyncpg.connect(database_url)
    stopped: int | None = None
    try:
        # Only this test's database, so only this test's server's backend.
        pid = await conn.fetchval(
            "SELECT pid FROM pg_stat_activity"
            " WHERE application_name = 'booking-auth-listener' AND datname = current_database()"
        )
        assert pid is not None
        # A half-open connection: the backend neither answers nor closes.
        os.kill(pid, signal.SIGSTOP)
        stopped = pid
        # Deactivate behind the server's back; the NOTIFY reaches nobody.
        await conn.execute("UPDATE users SET is_active = false WHERE id = $1", uuid.UUID(user_id))
        start = time.monotonic()
        while True:
            try:
                await _who_am_i(client)
            except grpc.aio.AioRpcError as err:
                assert err.code() == UNAUTH
                break
            elapsed = time.monotonic() - start
            assert elapsed < 5, "a cached token outlived its user behind a stalled listener"
            await asyncio.sleep(0.05)
        took = time.monotonic() - start
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        await conn.close()
    assert took < 5
    # The server reconnects and trusts its cache again.
    await _listening(server)
