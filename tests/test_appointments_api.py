"""AppointmentService end to end over a real gRPC channel and a real
PostgreSQL: holds, NOT_FOUND, FAILED_PRECONDITION (including hold expiry on
a server with a tiny hold TTL), ListAppointments filters and pagination.

Transition success paths and illegal transitions (confirm, cancel, no-show,
reschedule, WRONG_STATE, re-holding a cancelled or expired slot, user
overlap) are in test_lifecycle.py, streams in test_event_stream.py, and
malformed requests in test_invalid_input.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from booking.v1 import appointment_pb2 as apb
from booking.v1 import slot_pb2 as spb
from booking.v1 import specialist_pb2 as sppb
from booking.v1 import user_pb2 as upb
from storage.models import Role
from tests.support import Api, expect_failure, hours_from_now, running_server, ts

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
MISSING_ID = "00000000-0000-4000-8000-000000000000"
SHORT_TTL = 0.2


@pytest.fixture
async def short_hold_api(database_url: str) -> AsyncIterator[Api]:
    """An ADMIN Api on a server whose holds lapse after SHORT_TTL seconds."""
    async with running_server(database_url, hold_ttl_seconds=SHORT_TTL) as server:
        async with Api.connect(server) as api:
            yield api


def _when(t: Timestamp) -> datetime:
    return t.ToDatetime(tzinfo=UTC)


async def _slot_status(api: Api, slot_id: str) -> int:
    return (await api.slots.GetSlot(spb.GetSlotRequest(id=slot_id), metadata=api.md)).slot.status


async def _get(api: Api, appointment_id: str) -> apb.Appointment:
    reply = await api.appointments.GetAppointment(
        apb.GetAppointmentRequest(id=appointment_id), metadata=api.md
    )
    return reply.appointment


async def _confirm(api: Api, appointment_id: str) -> apb.Appointment:
    reply = await api.appointments.ConfirmAppointment(
        apb.ConfirmAppointmentRequest(id=appointment_id), metadata=api.md
    )
    return reply.appointment


async def _cancel(api: Api, appointment_id: str, reason: str = "") -> apb.Appointment:
    reply = await api.appointments.CancelAppointment(
        apb.CancelAppointmentRequest(id=appointment_id, reason=reason), metadata=api.md
    )
    return reply.appointment


async def _reschedule(api: Api, appointment_id: str, new_slot_id: str) -> apb.Appointment:
    reply = await api.appointments.RescheduleAppointment(
        apb.RescheduleAppointmentRequest(id=appointment_id, new_slot_id=new_slot_id),
        metadata=api.md,
    )
    return reply.appointment


async def _list(api: Api, **kw: Any) -> apb.ListAppointmentsResponse:
    return await api.appointments.ListAppointments(
        apb.ListAppointmentsRequest(**kw),
        metadata=api.md,
    )


async def _list_ids(api: Api, **kw: Any) -> list[str]:
    return [a.id for a in (await _list(api, page_size=1000, **kw)).appointments]


async def _set_active(api: Api, specialist_id: str, active: bool) -> None:
    await api.specialists.UpdateSpecialist(
        sppb.UpdateSpecialistRequest(
            specialist=sppb.Specialist(id=specialist_id, active=active),
            update_mask=FieldMask(paths=["active"]),
        ),
        metadata=api.md,
    )


async def _user(api: Api) -> str:
    user_id, _ = await api.make_user(Role.CLIENT)
    return user_id


# --- success paths ---------------------------------------------------------


async def test_hold_slot_creates_a_hold_for_the_caller_that_expires_after_the_ttl(
    api: Api,
) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(24), 45)
    client, client_id = await api.client()
    held = await client.hold(slot.id)
    assert held.id
    assert (held.user_id, held.specialist_id, held.slot_id) == (client_id, spec.id, slot.id)
    assert held.status == apb.APPOINTMENT_STATUS_HOLD
    assert held.priority == apb.APPOINTMENT_PRIORITY_NORMAL
    assert (held.start_time, held.end_time) == (slot.start_time, slot.end_time)
    assert _when(held.expire_time) - _when(held.create_time) == timedelta(
        seconds=api.server.config.hold_ttl_seconds
    )
    assert await _slot_status(api, slot.id) == spb.SLOT_STATUS_HOLD
    assert await _get(client, held.id) == held


async def test_an_operator_can_hold_for_a_user_with_a_priority(api: Api) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(24))
    user_id = await _user(api)
    operator = api.as_(await api.make_token(Role.OPERATOR))
    held = await operator.hold(slot.id, user_id, priority=apb.APPOINTMENT_PRIORITY_URGENT)
    assert held.user_id == user_id
    assert held.priority == apb.APPOINTMENT_PRIORITY_URGENT


# --- hold expiry (tiny TTL server) -----------------------------------------


async def test_an_expired_hold_is_failed_precondition_hold_expired_for_confirm_and_reschedule(
    short_hold_api: Api,
) -> None:
    api = short_hold_api
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(24))
    client, _ = await api.client()
    held = await client.hold(slot.id)
    assert _when(held.expire_time) - _when(held.create_time) == timedelta(seconds=SHORT_TTL)
    await asyncio.sleep(SHORT_TTL + 0.15)
    async with expect_failure(PRECONDITION, "HOLD_EXPIRED") as box:
        await _confirm(client, held.id)
    assert box[0].metadata.get("appointment_id") == held.id
    assert await _slot_status(api, slot.id) != spb.SLOT_STATUS_BOOKED
    assert (await _get(api, held.id)).status != apb.APPOINTMENT_STATUS_CONFIRMED
    spare = await api.slot(spec.id, hours_from_now(26))
    async with expect_failure(PRECONDITION, "HOLD_EXPIRED"):
        await _reschedule(client, held.id, spare.id)


# --- NOT_FOUND -------------------------------------------------------------


async def test_hold_of_an_unknown_slot_or_for_an_unknown_user_is_not_found(api: Api) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(24))
    async with expect_failure(NOT_FOUND, "SLOT_NOT_FOUND"):
        await api.hold(MISSING_ID)
    async with expect_failure(NOT_FOUND, "USER_NOT_FOUND"):
        await api.hold(slot.id, MISSING_ID)
    assert await _slot_status(api, slot.id) == spb.SLOT_STATUS_AVAILABLE
    assert (await _list(api)).appointments == []


async def test_every_rpc_on_an_unknown_appointment_is_not_found(api: Api) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(24))
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: _get(api, MISSING_ID),
        lambda: _confirm(api, MISSING_ID),
        lambda: _cancel(api, MISSING_ID, "why not"),
        lambda: _reschedule(api, MISSING_ID, slot.id),
        lambda: api.appointments.MarkNoShow(apb.MarkNoShowRequest(id=MISSING_ID), metadata=api.md),
    ]
    for call in calls:
        async with expect_failure(NOT_FOUND, "APPOINTMENT_NOT_FOUND"):
            await call()
    assert await _slot_status(api, slot.id) == spb.SLOT_STATUS_AVAILABLE


async def test_reschedule_to_a_deleted_slot_is_not_found_and_keeps_the_original(
    api: Api,
) -> None:
    spec = await api.specialist()
    a = await api.slot(spec.id, hours_from_now(24))
    gone = await api.slot(spec.id, hours_from_now(26))
    await api.slots.DeleteSlot(spb.DeleteSlotRequest(id=gone.id), metadata=api.md)
    held = await api.hold(a.id)
    async with expect_failure(NOT_FOUND, "SLOT_NOT_FOUND"):
        await _reschedule(api, held.id, gone.id)
    assert await _get(api, held.id) == held
    assert await _slot_status(api, a.id) == spb.SLOT_STATUS_HOLD


# --- FAILED_PRECONDITION ---------------------------------------------------


async def test_holding_a_held_or_booked_slot_is_failed_precondition(api: Api) -> None:
    spec = await api.specialist()
    held_slot = await api.slot(spec.id, hours_from_now(24))
    booked_slot = await api.slot(spec.id, hours_from_now(26))
    first, _ = await api.client()
    second, _ = await api.client()
    held = await first.hold(held_slot.id)
    booked = await _confirm(first, (await first.hold(booked_slot.id)).id)

    for slot_id, status in [(held_slot.id, "HOLD"), (booked_slot.id, "BOOKED")]:
        async with expect_failure(PRECONDITION, "SLOT_UNAVAILABLE") as box:
            await second.hold(slot_id)
        assert box[0].metadata == {"slot_id": slot_id, "status": status}
        async with expect_failure(PRECONDITION, "SLOT_UNAVAILABLE"):
            await first.hold(slot_id)  # not even the holder gets a second one
    assert await _get(first, held.id) == held
    assert await _get(first, booked.id) == booked
    assert len(await _list_ids(api)) == 2


async def test_holding_a_slot_of_an_inactive_specialist_is_failed_precondition(api: Api) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(24))
    client, _ = await api.client()
    await _set_active(api, spec.id, False)
    async with expect_failure(PRECONDITION, "SPECIALIST_INACTIVE") as box:
        await client.hold(slot.id)
    assert box[0].metadata == {"specialist_id": spec.id}
    assert await _slot_status(api, slot.id) == spb.SLOT_STATUS_AVAILABLE
    assert (await _list(api)).appointments == []
    await _set_active(api, spec.id, True)
    assert (await client.hold(slot.id)).status == apb.APPOINTMENT_STATUS_HOLD


async def test_holding_for_an_inactive_user_is_failed_precondition(api: Api) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(24))
    user_id = await _user(api)
    await api.users.UpdateUser(
        upb.UpdateUserRequest(
            user=upb.User(id=user_id, active=False), update_mask=FieldMask(paths=["active"])
        ),
        metadata=api.md,
    )
    async with expect_failure(PRECONDITION, "USER_INACTIVE"):
        await api.hold(slot.id, user_id)
    assert await _slot_status(api, slot.id) == spb.SLOT_STATUS_AVAILABLE


async def test_one_user_cannot_hold_two_overlapping_slots_but_adjacent_ones_are_fine(
    api: Api,
) -> None:
    a, b = await api.specialist("A"), await api.specialist("B")
    t = hours_from_now(24)
    slot_a = await api.slot(a.id, t, 60)
    overlapping = await api.slot(b.id, t + timedelta(minutes=30), 60)
    adjacent = await api.slot(b.id, t + timedelta(minutes=90), 30)
    client, _ = await api.client()
    first = await client.hold(slot_a.id)
    async with expect_failure(PRECONDITION, "USER_OVERLAP") as box:
        await client.hold(overlapping.id)
    assert box[0].metadata.get("conflicting_appointment_id") == first.id
    assert await _slot_status(api, overlapping.id) == spb.SLOT_STATUS_AVAILABLE
    assert (await client.hold(adjacent.id)).slot_id == adjacent.id


# --- ListAppointments filters and pagination --------------------------------


async def test_list_appointments_filters_by_user_specialist_status_and_window(api: Api) -> None:
    spec_a, spec_b = await api.specialist("A"), await api.specialist("B")
    u1, u2 = await _user(api), await _user(api)
    t = hours_from_now(24)
    s1 = await api.slot(spec_a.id, t)  # [t, t+30m)
    s2 = await api.slot(spec_b.id, t + timedelta(hours=1))
    s3 = await api.slot(spec_a.id, t + timedelta(hours=2))
    s4 = await api.slot(spec_b.id, t + timedelta(hours=3))
    a1 = await api.hold(s1.id, u1)
    a2 = await _confirm(api, (await api.hold(s2.id, u1)).id)
    a3 = await _cancel(api, (await api.hold(s3.id, u2)).id)
    a4 = await api.hold(s4.id, u2)

    assert await _list_ids(api) == [a1.id, a2.id, a3.id, a4.id]
    assert await _list_ids(api, user_id=u1) == [a1.id, a2.id]
    assert await _list_ids(api, user_id=u2) == [a3.id, a4.id]
    assert await _list_ids(api, specialist_id=spec_a.id) == [a1.id, a3.id]
    assert await _list_ids(api, specialist_id=spec_b.id) == [a2.id, a4.id]
    assert await _list_ids(api, status=apb.APPOINTMENT_STATUS_HOLD) == [a1.id, a4.id]
    assert await _list_ids(api, status=apb.APPOINTMENT_STATUS_CONFIRMED) == [a2.id]
    assert await _list_ids(api, status=apb.APPOINTMENT_STATUS_CANCELLED) == [a3.id]
    assert await _list_ids(api, status=apb.APPOINTMENT_STATUS_NO_SHOW) == []
    assert await _list_ids(api, user_id=u2, specialist_id=spec_b.id) == [a4.id]
    assert await _list_ids(api, user_id=u1, status=apb.APPOINTMENT_STATUS_HOLD) == [a1.id]
    assert await _list_ids(api, user_id=MISSING_ID) == []
    # Windows: the slot must end after window_start and start before window_end.
    after_s1 = ts(t + timedelta(minutes=30))
    assert await _list_ids(api, window_start_time=after_s1) == [a2.id, a3.id, a4.id]
    before_s3 = ts(t + timedelta(hours=2))
    assert await _list_ids(api, window_end_time=before_s3) == [a1.id, a2.id]
    middle: dict[str, Any] = {
        "window_start_time": ts(t + timedelta(minutes=75)),
        "window_end_time": ts(t + timedelta(hours=3)),
    }
    assert await _list_ids(api, **middle) == [a2.id, a3.id]
    assert await _list_ids(api, specialist_id=spec_a.id, **middle) == [a3.id]


async def test_walking_appointment_pages_returns_every_one_once_in_start_order(
    api: Api,
) -> None:
    spec_a, spec_b = await api.specialist("A"), await api.specialist("B")
    u1, u2 = await _user(api), await _user(api)
    t = hours_from_now(24)
    for hour in (3, 0, 2, 1):  # created out of order; A and B slots start together
        for spec, user in ((spec_a, u1), (spec_b, u2)):
            slot = await api.slot(spec.id, t + timedelta(hours=hour))
            await api.hold(slot.id, user)
    everything = (await _list(api, page_size=1000)).appointments
    assert len(everything) == 8
    expected = sorted(everything, key=lambda a: (_when(a.start_time), a.id))
    assert [a.id for a in everything] == [a.id for a in expected]

    for size in (1, 3, 8):
        walked: list[str] = []
        token, pages = "", 0
        while True:
            page = await _list(api, page_size=size, page_token=token)
            pages += 1
            walked.extend(a.id for a in page.appointments)
            token = page.next_page_token
            if not token:
                break
        assert walked == [a.id for a in expected], f"page_size={size}"
        assert pages == -(-8 // size)

    first = await _list(api, page_size=2, user_id=u1)
    assert first.next_page_token
    changed: list[dict[str, Any]] = [
        {"user_id": u2},
        {},
        {"user_id": u1, "specialist_id": spec_a.id},
        {"user_id": u1, "status": apb.APPOINTMENT_STATUS_HOLD},
        {"user_id": u1, "window_start_time": ts(t)},
    ]
    for filters in changed:
        async with expect_failure(INVALID) as box:
            await _list(api, page_size=2, page_token=first.next_page_token, **filters)
        assert box[0].violations == ["page_token"], filters
    rest = await _list(api, page_size=2, page_token=first.next_page_token, user_id=u1)
    assert len(rest.appointments) == 2
    assert {a.user_id for a in rest.appointments} == {u1}
