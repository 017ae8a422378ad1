"""Request ids (AIP-155): one answer per request, remembered per caller,
failures included, for a retention period; and refusals that are true."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg
import grpc

from booking.v1 import appointment_pb2 as apb
from booking.v1 import appointment_pb2_grpc
from service.config import ConfigError, from_sources
from service.server import BookingServer
from tests.population import fetch
from tests.support import Api, RpcFailure, ServerConfig, failure, hours_from_now, running_server

FAILED = grpc.StatusCode.FAILED_PRECONDITION

# An answer, comparable across copies: ("OK", appointment id, status) or
# (code, reason, metadata).
Answer = tuple[Any, ...]


def _answer_of(err: grpc.aio.AioRpcError) -> Answer:
    got: RpcFailure = failure(err)
    return (got.code, got.reason, tuple(sorted(got.metadata.items())))


async def _hold(api: Api, slot_id: str, request_id: str) -> Answer:
    try:
        reply = await api.appointments.HoldSlot(
            apb.HoldSlotRequest(slot_id=slot_id, request_id=request_id), metadata=api.md
        )
    except grpc.aio.AioRpcError as err:
        return _answer_of(err)
    return ("OK", reply.appointment.id, reply.appointment.status)


async def _cancel(api: Api, appointment_id: str, request_id: str = "") -> Answer:
    try:
        reply = await api.appointments.CancelAppointment(
            apb.CancelAppointmentRequest(id=appointment_id, request_id=request_id),
            metadata=api.md,
        )
    except grpc.aio.AioRpcError as err:
        return _answer_of(err)
    return ("OK", reply.appointment.id, reply.appointment.status)


def _slot_unavailable(slot_id: str, status: str) -> Answer:
    return (FAILED, "SLOT_UNAVAILABLE", (("slot_id", slot_id), ("status", status)))


async def test_a_refused_hold_replays_its_refusal_after_the_slot_is_freed(api: Api) -> None:
    holder, _ = await api.client()
    other, _ = await api.client()
    slot = await api.slot((await api.specialist()).id, hours_from_now(30))
    held = await holder.hold(slot.id)
    request_id = str(uuid.uuid4())

    first = await _hold(other, slot.id, request_id)
    assert await _cancel(holder, held.id) == ("OK", held.id, apb.APPOINTMENT_STATUS_CANCELLED)
    second = await _hold(other, slot.id, request_id)

    assert first == _slot_unavailable(slot.id, "HOLD")
    assert second == first
    # The refusal belongs to that request only: a new one takes the free slot.
    fresh = await _hold(other, slot.id, str(uuid.uuid4()))
    assert fresh[0] == "OK"


async def test_a_remembered_user_overlap_replays_the_same_reason_and_metadata(
    api: Api, database_url: str
) -> None:
    client, client_id = await api.client()
    start = hours_from_now(40)
    first_slot = await api.slot((await api.specialist("A")).id, start)
    overlapping = await api.slot((await api.specialist("B")).id, start)
    held = await client.hold(first_slot.id)
    request_id = str(uuid.uuid4())

    first = await _hold(client, overlapping.id, request_id)
    await _cancel(client, held.id)
    second = await _hold(client, overlapping.id, request_id)

    assert first == (
        FAILED,
        "USER_OVERLAP",
        (("conflicting_appointment_id", held.id), ("user_id", client_id)),
    )
    assert second == first
    rows = await fetch(
        database_url,
        "SELECT operation, event_id, error_reason FROM idempotency_keys WHERE request_id = $1",
        uuid.UUID(request_id),
    )
    assert [tuple(r) for r in rows] == [("HoldSlot", None, "USER_OVERLAP")]


async def _waiting_backend(database_url: str, function: str) -> None:
    """Returns once a server backend waits on a lock inside `function`."""
    while True:
        rows = await fetch(
            database_url,
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE '%' || $1 || '%'",
            function,
        )
        if rows:
            return
        await asyncio.sleep(0.01)


async def _call_while_locked(
    database_url: str, lock_sql: str, lock_args: tuple[object, ...], call: Awaitable[Answer]
) -> tuple[asyncpg.Connection, Any, asyncio.Task[Answer]]:
    """Holds a lock in an open transaction and starts `call`; returns once
    the call waits on that lock (failing if it answered without waiting)."""
    conn = await asyncpg.connect(database_url)
    tx = conn.transaction()
    await tx.start()
    await conn.execute(lock_sql, *lock_args)
    task = asyncio.ensure_future(call)
    waiting = asyncio.ensure_future(_waiting_backend(database_url, "booking_hold_slot"))
    done, _ = await asyncio.wait({task, waiting}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if task in done:
        await tx.rollback()
        await conn.close()
        raise AssertionError(f"the call answered without waiting for the lock: {task.result()}")
    assert waiting in done, "the call neither answered nor waited on the lock"
    return conn, tx, task


async def test_a_hold_waiting_on_a_lock_holder_that_rolls_back_wins_the_slot(
    api: Api, database_url: str
) -> None:
    client, _ = await api.client()
    slot = await api.slot((await api.specialist()).id, hours_from_now(50))
    # Another transaction locks the slot and starts changing it, then fails.
    conn, tx, task = await _call_while_locked(
        database_url,
        "UPDATE time_slots SET status = 'HOLD' WHERE id = $1",
        (uuid.UUID(slot.id),),
        _hold(client, slot.id, ""),
    )
    try:
        await tx.rollback()
    finally:
        await conn.close()

    answer = await asyncio.wait_for(task, 30)

    assert answer[0] == "OK", answer
    assert answer[2] == apb.APPOINTMENT_STATUS_HOLD


async def test_a_request_answered_unavailable_is_not_remembered(
    api: Api, database_url: str
) -> None:
    client, _ = await api.client()
    slot = await api.slot((await api.specialist()).id, hours_from_now(55))
    request_id = str(uuid.uuid4())
    conn, tx, task = await _call_while_locked(
        database_url,
        "SELECT 1 FROM time_slots WHERE id = $1 FOR UPDATE",
        (uuid.UUID(slot.id),),
        _hold(client, slot.id, request_id),
    )
    try:
        # The statement is cancelled as a statement_timeout would cancel it.
        await conn.execute(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND query LIKE '%booking_hold_slot%'"
        )
        first = await asyncio.wait_for(task, 30)
    finally:
        await tx.rollback()
        await conn.close()

    second = await _hold(client, slot.id, request_id)

    assert first[0] == grpc.StatusCode.UNAVAILABLE, first
    assert second[0] == "OK", second


async def _copies_racing_a_cancel(api: Api, targets: list[str]) -> list[list[Answer]]:
    """Rounds in which copies of one hold (spread over `targets`) land before
    and after the slot is freed; returns the rounds whose copies disagreed."""
    holder, _ = await api.client()
    other, _ = await api.client()
    spec = await api.specialist()
    channels = [grpc.aio.insecure_channel(targets[i % len(targets)]) for i in range(6)]
    mixed_rounds = []
    try:
        for round_ in range(12):
            slot = await api.slot(spec.id, hours_from_now(60 + round_))
            held = await holder.hold(slot.id)
            request_id = str(uuid.uuid4())

            async def copy(i: int, slot_id: str = slot.id, rid: str = request_id) -> Answer:
                await asyncio.sleep(0.002 * i)
                stub = appointment_pb2_grpc.AppointmentServiceStub(channels[i])
                try:
                    reply = await stub.HoldSlot(
                        apb.HoldSlotRequest(slot_id=slot_id, request_id=rid), metadata=other.md
                    )
                except grpc.aio.AioRpcError as err:
                    return _answer_of(err)
                return ("OK", reply.appointment.id, reply.appointment.status)

            async def free(held_id: str = held.id) -> Answer:
                await asyncio.sleep(0.005)
                return await _cancel(holder, held_id)

            *answers, freed = await asyncio.gather(*(copy(i) for i in range(6)), free())
            assert freed[0] == "OK"
            assert answers[0][0] == "OK" or answers[0] == _slot_unavailable(slot.id, "HOLD")
            if len(set(answers)) != 1:
                mixed_rounds.append(answers)
    finally:
        await asyncio.gather(*(ch.close(None) for ch in channels))
    return mixed_rounds


async def test_copies_of_one_request_racing_a_cancel_all_get_one_answer(api: Api) -> None:
    """However the copies interleave with the cancel, all of them get the
    first stored outcome."""
    assert await _copies_racing_a_cancel(api, [f"127.0.0.1:{api.server.port}"]) == []


async def test_copies_sent_to_two_replicas_get_one_answer(api: Api, database_url: str) -> None:
    async with running_server(database_url) as second:
        targets = [f"127.0.0.1:{api.server.port}", f"127.0.0.1:{second.port}"]
        assert await _copies_racing_a_cancel(api, targets) == []


async def test_another_callers_request_id_is_theirs_alone(api: Api) -> None:
    alice, _ = await api.client()
    bob, _ = await api.client()
    spec = await api.specialist()
    request_id = str(uuid.uuid4())
    bobs = await _hold(bob, (await api.slot(spec.id, hours_from_now(80))).id, request_id)
    assert bobs[0] == "OK"

    # Bob's request id on Bob's appointment: exactly what Alice gets for any
    # appointment that is not hers.
    replayed = await _cancel(alice, bobs[1], request_id)
    plain = await _cancel(alice, bobs[1], str(uuid.uuid4()))
    missing = await _cancel(alice, str(uuid.uuid4()), str(uuid.uuid4()))

    assert replayed[:2] == (grpc.StatusCode.NOT_FOUND, "APPOINTMENT_NOT_FOUND")
    assert replayed == plain
    assert replayed[:2] == missing[:2]


async def test_two_callers_use_one_request_id_independently(api: Api) -> None:
    alice, _ = await api.client()
    bob, _ = await api.client()
    spec = await api.specialist()
    request_id = str(uuid.uuid4())
    bob_slot = await api.slot(spec.id, hours_from_now(82))
    alice_slot = await api.slot(spec.id, hours_from_now(83))

    bobs = await _hold(bob, bob_slot.id, request_id)
    alices = await _hold(alice, alice_slot.id, request_id)

    assert bobs[0] == "OK" and alices[0] == "OK"
    assert bobs[1] != alices[1]
    # Each caller's copy replays that caller's own outcome.
    assert await _hold(bob, bob_slot.id, request_id) == bobs
    assert await _hold(alice, alice_slot.id, request_id) == alices


@asynccontextmanager
async def _sweeping_server(database_url: str) -> AsyncIterator[Api]:
    server = BookingServer(
        ServerConfig.for_tests(
            database_url, sweep_interval_seconds=0.05, request_id_retention_hours=24.0
        )
    )
    await server.start()
    try:
        async with Api.connect(server) as api:
            yield api
    finally:
        await server.stop(grace=1)


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(30):
        while True:
            if await check():
                return
            await asyncio.sleep(0.02)


async def test_request_ids_past_their_retention_are_forgotten(database_url: str) -> None:
    async with _sweeping_server(database_url) as api:
        holder, _ = await api.client()
        other, _ = await api.client()
        spec = await api.specialist()
        slot = await api.slot(spec.id, hours_from_now(90))
        held = await holder.hold(slot.id)
        old_id, recent_id = str(uuid.uuid4()), str(uuid.uuid4())
        refused = await _hold(other, slot.id, old_id)
        assert refused == _slot_unavailable(slot.id, "HOLD")
        recent_slot = await api.slot(spec.id, hours_from_now(91))
        recent = await _hold(other, recent_slot.id, recent_id)
        assert recent[0] == "OK"
        await fetch(
            database_url,
            "UPDATE idempotency_keys SET created_at = now() - interval '25 hours'"
            " WHERE request_id = $1",
            uuid.UUID(old_id),
        )

        async def forgotten() -> bool:
            rows = await fetch(
                database_url,
                "SELECT 1 FROM idempotency_keys WHERE request_id = $1",
                uuid.UUID(old_id),
            )
            return not rows

        await _until(forgotten)
        await _cancel(holder, held.id)

        # Forgotten: the same id now runs anew and takes the freed slot.
        again = await _hold(other, slot.id, old_id)
        assert again[0] == "OK"
        # Within the retention period an id still replays.
        assert await _hold(other, recent_slot.id, recent_id) == recent


def test_request_id_retention_is_configurable() -> None:
    config = from_sources(environ={"BOOKING_REQUEST_ID_RETENTION_HOURS": "2"})
    assert config.request_id_retention == timedelta(hours=2)
    assert from_sources(environ={}).request_id_retention == timedelta(hours=24)
    try:
        from_sources(environ={"BOOKING_REQUEST_ID_RETENTION_HOURS": "0"})
    except ConfigError as exc:
        assert "request_id_retention_hours" in str(exc)
    else:
        raise AssertionError("a zero retention was accepted")
