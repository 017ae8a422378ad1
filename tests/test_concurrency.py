"""Races fought by real concurrent clients, each on its own channel."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import grpc

from booking.v1 import appointment_pb2 as apb
from booking.v1 import appointment_pb2_grpc, slot_pb2, slot_pb2_grpc
from storage.models import Role
from tests.population import fetch, insert_clients
from tests.support import Api, hours_from_now, running_server, ts


async def _race(
    api: Api, count: int, call: Callable[[Any, int], Awaitable[Any]], channels: int = 16
) -> list[grpc.StatusCode]:
    """Run `count` calls at once over `channels` separate connections; the
    status code of each."""
    target = f"127.0.0.1:{api.server.port}"
    opened = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    try:
        await asyncio.gather(*(ch.channel_ready() for ch in opened))
        start = asyncio.Event()

        async def one(i: int) -> grpc.StatusCode:
            await start.wait()
            try:
                await call(opened[i % channels], i)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as err:
                return err.code()

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        await asyncio.sleep(0.05)
        start.set()
        return list(await asyncio.gather(*tasks))
    finally:
        await asyncio.gather(*(ch.close(None) for ch in opened))


async def test_64_concurrent_holds_on_one_slot_give_exactly_one_hold(
    api: Api, database_url: str
) -> None:
    operator = api.as_(await api.make_token(Role.OPERATOR))
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(30))
    users = await insert_clients(database_url, 64)

    async def hold(channel: grpc.aio.Channel, i: int) -> None:
        stub = appointment_pb2_grpc.AppointmentServiceStub(channel)
        await stub.HoldSlot(
            apb.HoldSlotRequest(slot_id=slot.id, user_id=users[i]), metadata=operator.md
        )

    codes = Counter(await _race(api, 64, hold))

    assert codes == {grpc.StatusCode.OK: 1, grpc.StatusCode.FAILED_PRECONDITION: 63}
    live = await fetch(
        database_url,
        "SELECT status FROM appointments WHERE time_slot_id = $1 AND status <> 'CANCELLED'",
        uuid.UUID(slot.id),
    )
    assert [r["status"] for r in live] == ["HOLD"]
    slot_rows = await fetch(
        database_url, "SELECT status FROM time_slots WHERE id = $1", uuid.UUID(slot.id)
    )
    assert slot_rows[0]["status"] == "HOLD"
    events = await fetch(database_url, "SELECT event_type FROM appointment_events")
    assert [e["event_type"] for e in events] == ["HELD"]


async def test_32_concurrent_overlapping_slots_for_one_specialist_give_exactly_one(
    api: Api, database_url: str
) -> None:
    spec = await api.specialist()
    base = hours_from_now(40)

    async def create(channel: grpc.aio.Channel, i: int) -> None:
        stub = slot_pb2_grpc.SlotServiceStub(channel)
        start = base + timedelta(minutes=i)  # every pair overlaps: each lasts an hour
        await stub.CreateSlot(
            slot_pb2.CreateSlotRequest(
                specialist_id=spec.id, start_time=ts(start), end_time=ts(start + timedelta(hours=1))
            ),
            metadata=api.md,
        )

    codes = Counter(await _race(api, 32, create))

    assert codes == {grpc.StatusCode.OK: 1, grpc.StatusCode.ALREADY_EXISTS: 31}
    rows = await fetch(database_url, "SELECT count(*) AS n FROM time_slots")
    assert rows[0]["n"] == 1


async def test_16_concurrent_holds_by_one_user_on_overlapping_slots_give_exactly_one(
    api: Api, database_url: str
) -> None:
    client, client_id = await api.client()
    start = hours_from_now(50)
    slots = []
    for i in range(16):
        spec = await api.specialist(name=f"Specialist {i}")
        slots.append(await api.slot(spec.id, start + timedelta(minutes=i), minutes=60))

    async def hold(channel: grpc.aio.Channel, i: int) -> None:
        stub = appointment_pb2_grpc.AppointmentServiceStub(channel)
        await stub.HoldSlot(apb.HoldSlotRequest(slot_id=slots[i].id), metadata=client.md)

    codes = Counter(await _race(api, 16, hold))

    assert codes == {grpc.StatusCode.OK: 1, grpc.StatusCode.FAILED_PRECONDITION: 15}
    live = await fetch(
        database_url,
        "SELECT count(*) AS n FROM appointments WHERE user_id = $1 AND status = 'HOLD'",
        uuid.UUID(client_id),
    )
    assert live[0]["n"] == 1


async def test_racing_retries_with_one_request_id_hold_once_and_agree(
    api: Api, database_url: str
) -> None:
    client, _ = await api.client()
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(60))
    request_id = str(uuid.uuid4())
    seen: list[str] = []

    async def hold(channel: grpc.aio.Channel, i: int) -> None:
        stub = appointment_pb2_grpc.AppointmentServiceStub(channel)
        reply = await stub.HoldSlot(
            apb.HoldSlotRequest(slot_id=slot.id, request_id=request_id), metadata=client.md
        )
        seen.append(reply.appointment.id)

    codes = Counter(await _race(api, 12, hold, channels=12))

    assert codes == {grpc.StatusCode.OK: 12}
    assert len(set(seen)) == 1
    rows = await fetch(database_url, "SELECT count(*) AS n FROM appointments")
    assert rows[0]["n"] == 1
    events = await fetch(database_url, "SELECT count(*) AS n FROM appointment_events")
    assert events[0]["n"] == 1


async def test_racing_cancel_retries_with_one_request_id_cancel_once(
    api: Api, database_url: str
) -> None:
    client, _ = await api.client()
    spec = await api.specialist()
    held = await client.hold((await api.slot(spec.id, hours_from_now(61))).id)
    request_id = str(uuid.uuid4())

    async def cancel(channel: grpc.aio.Channel, i: int) -> None:
        stub = appointment_pb2_grpc.AppointmentServiceStub(channel)
        reply = await stub.CancelAppointment(
            apb.CancelAppointmentRequest(id=held.id, reason="changed plans", request_id=request_id),
            metadata=client.md,
        )
        assert reply.appointment.status == apb.APPOINTMENT_STATUS_CANCELLED

    codes = Counter(await _race(api, 10, cancel, channels=10))

    assert codes == {grpc.StatusCode.OK: 10}
    events = await fetch(
        database_url, "SELECT event_type FROM appointment_events ORDER BY xid, seq"
    )
    assert [e["event_type"] for e in events] == ["HELD", "CANCELLED"]


async def test_concurrent_reschedules_into_one_slot_move_exactly_one(
    api: Api, database_url: str
) -> None:
    spec = await api.specialist()
    target = await api.slot(spec.id, hours_from_now(70))
    operator = api.as_(await api.make_token(Role.OPERATOR))
    users = await insert_clients(database_url, 8)
    held = []
    for i, user in enumerate(users):
        slot = await api.slot(spec.id, hours_from_now(71 + i))
        held.append(await operator.hold(slot.id, user_id=user))

    async def move(channel: grpc.aio.Channel, i: int) -> None:
        stub = appointment_pb2_grpc.AppointmentServiceStub(channel)
        await stub.RescheduleAppointment(
            apb.RescheduleAppointmentRequest(id=held[i].id, new_slot_id=target.id),
            metadata=operator.md,
        )

    codes = Counter(await _race(api, 8, move, channels=8))

    assert codes == {grpc.StatusCode.OK: 1, grpc.StatusCode.FAILED_PRECONDITION: 7}
    occupants = await fetch(
        database_url,
        "SELECT count(*) AS n FROM appointments WHERE time_slot_id = $1 AND status <> 'CANCELLED'",
        uuid.UUID(target.id),
    )
    assert occupants[0]["n"] == 1
    # Every loser still has its original slot, still held.
    statuses = await fetch(
        database_url, "SELECT status, count(*) AS n FROM time_slots GROUP BY status"
    )
    assert {r["status"]: r["n"] for r in statuses} == {"HOLD": 8, "AVAILABLE": 1}


async def test_racing_request_id_retries_agree_even_without_the_user_lock(
    database_url: str,
) -> None:
    # With the overlap check off nothing serialises the retries before the
    # slot lock, so they meet it held and must wait for the first copy's
    # outcome, not fail.
    async with running_server(database_url, check_user_overlap=False) as server:
        async with Api.connect(server) as api:
            client, _ = await api.client()
            spec = await api.specialist()
            slot = await api.slot(spec.id, hours_from_now(62))
            request_id = str(uuid.uuid4())
            seen: list[str] = []

            async def hold(channel: grpc.aio.Channel, i: int) -> None:
                stub = appointment_pb2_grpc.AppointmentServiceStub(channel)
                reply = await stub.HoldSlot(
                    apb.HoldSlotRequest(slot_id=slot.id, request_id=request_id),
                    metadata=client.md,
                )
                seen.append(reply.appointment.id)

            codes = Counter(await _race(api, 12, hold, channels=12))

    assert codes == {grpc.StatusCode.OK: 12}
    assert len(set(seen)) == 1
    rows = await fetch(database_url, "SELECT count(*) AS n FROM appointments")
    assert rows[0]["n"] == 1
