"""Appointment transitions, legal and illegal, and hold expiry."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from booking.v1 import appointment_pb2 as apb
from booking.v1 import slot_pb2 as spb
from service.config import Config
from service.server import BookingServer
from storage.models import Role
from tests.population import fetch, insert_clients
from tests.support import Api, ServerConfig, expect_failure, hours_from_now

S = apb  # status constants live on the appointment module


async def _confirm(api: Api, appointment_id: str, **kw: str) -> apb.Appointment:
    reply = await api.appointments.ConfirmAppointment(
        apb.ConfirmAppointmentRequest(id=appointment_id, **kw), metadata=api.md
    )
    return reply.appointment


async def _cancel(api: Api, appointment_id: str, reason: str = "") -> apb.Appointment:
    reply = await api.appointments.CancelAppointment(
        apb.CancelAppointmentRequest(id=appointment_id, reason=reason), metadata=api.md
    )
    return reply.appointment


async def _no_show(api: Api, appointment_id: str) -> apb.Appointment:
    reply = await api.appointments.MarkNoShow(
        apb.MarkNoShowRequest(id=appointment_id), metadata=api.md
    )
    return reply.appointment


async def _reschedule(api: Api, appointment_id: str, slot_id: str) -> apb.Appointment:
    reply = await api.appointments.RescheduleAppointment(
        apb.RescheduleAppointmentRequest(id=appointment_id, new_slot_id=slot_id), metadata=api.md
    )
    return reply.appointment


async def _slot_status(api: Api, slot_id: str) -> int:
    reply = await api.slots.GetSlot(spb.GetSlotRequest(id=slot_id), metadata=api.md)
    return reply.slot.status


async def _event_types(database_url: str, appointment_id: str) -> list[str]:
    rows = await fetch(
        database_url,
        "SELECT event_type FROM appointment_events WHERE appointment_id = $1 ORDER BY xid, seq",
        uuid.UUID(appointment_id),
    )
    return [r["event_type"] for r in rows]


async def test_confirm_moves_hold_to_confirmed_and_books_the_slot(
    api: Api, database_url: str
) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(5))
    held = await api.hold(slot.id)
    assert held.HasField("expire_time")

    confirmed = await _confirm(api, held.id)

    assert confirmed.status == S.APPOINTMENT_STATUS_CONFIRMED
    assert not confirmed.HasField("expire_time")
    assert await _slot_status(api, slot.id) == spb.SLOT_STATUS_BOOKED
    assert await _event_types(database_url, held.id) == ["HELD", "CONFIRMED"]


async def test_cancel_frees_the_slot_and_records_the_reason(api: Api, database_url: str) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(5))
    held = await api.hold(slot.id)
    await _confirm(api, held.id)

    cancelled = await _cancel(api, held.id, reason="feeling better")

    assert cancelled.status == S.APPOINTMENT_STATUS_CANCELLED
    assert await _slot_status(api, slot.id) == spb.SLOT_STATUS_AVAILABLE
    rows = await fetch(
        database_url,
        "SELECT old_status, new_status, reason FROM appointment_events"
        " WHERE appointment_id = $1 AND event_type = 'CANCELLED'",
        uuid.UUID(held.id),
    )
    assert [(r["old_status"], r["new_status"], r["reason"]) for r in rows] == [
        ("CONFIRMED", "CANCELLED", "feeling better")
    ]


async def test_a_hold_can_be_cancelled(api: Api) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(5))
    held = await api.hold(slot.id)
    assert (await _cancel(api, held.id)).status == S.APPOINTMENT_STATUS_CANCELLED
    assert await _slot_status(api, slot.id) == spb.SLOT_STATUS_AVAILABLE


async def test_a_cancelled_slot_can_be_held_again(api: Api, database_url: str) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(5))
    first, _ = await api.client()
    second, second_id = await api.client()
    held = await first.hold(slot.id)
    await _cancel(first, held.id)

    again = await second.hold(slot.id)

    assert again.user_id == second_id and again.id != held.id
    live = await fetch(
        database_url,
        "SELECT count(*) AS n FROM appointments WHERE time_slot_id = $1 AND status <> 'CANCELLED'",
        uuid.UUID(slot.id),
    )
    assert live[0]["n"] == 1


async def test_no_show_needs_a_confirmed_appointment_whose_slot_has_started(
    api: Api, database_url: str
) -> None:
    spec = await api.specialist()
    past = await api.slot(spec.id, hours_from_now(-1))
    future = await api.slot(spec.id, hours_from_now(3))
    past_appt = await api.hold(past.id)
    future_appt = await api.hold(future.id)

    async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "WRONG_STATE"):
        await _no_show(api, past_appt.id)
    await _confirm(api, past_appt.id)
    await _confirm(api, future_appt.id)
    async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "SLOT_NOT_STARTED"):
        await _no_show(api, future_appt.id)

    marked = await _no_show(api, past_appt.id)

    assert marked.status == S.APPOINTMENT_STATUS_NO_SHOW
    assert await _slot_status(api, past.id) == spb.SLOT_STATUS_BOOKED
    assert await _event_types(database_url, past_appt.id) == ["HELD", "CONFIRMED", "NO_SHOW"]


async def test_reschedule_moves_a_hold_and_keeps_its_state(api: Api, database_url: str) -> None:
    spec = await api.specialist()
    old = await api.slot(spec.id, hours_from_now(5))
    new = await api.slot(spec.id, hours_from_now(6))
    held = await api.hold(old.id)

    moved = await _reschedule(api, held.id, new.id)

    assert moved.id == held.id and moved.slot_id == new.id
    assert moved.status == S.APPOINTMENT_STATUS_HOLD
    assert moved.expire_time == held.expire_time, "rescheduling must not extend a hold"
    assert await _slot_status(api, old.id) == spb.SLOT_STATUS_AVAILABLE
    assert await _slot_status(api, new.id) == spb.SLOT_STATUS_HOLD
    rows = await fetch(
        database_url,
        "SELECT previous_slot_id, time_slot_id FROM appointment_events WHERE event_type = 'RESCHEDULED'",
    )
    assert [(str(r["previous_slot_id"]), str(r["time_slot_id"])) for r in rows] == [
        (old.id, new.id)
    ]


async def test_reschedule_of_a_confirmed_appointment_books_the_new_slot(api: Api) -> None:
    spec = await api.specialist()
    old = await api.slot(spec.id, hours_from_now(5))
    new = await api.slot(spec.id, hours_from_now(6))
    held = await api.hold(old.id)
    await _confirm(api, held.id)

    moved = await _reschedule(api, held.id, new.id)

    assert moved.status == S.APPOINTMENT_STATUS_CONFIRMED
    assert await _slot_status(api, new.id) == spb.SLOT_STATUS_BOOKED
    assert await _slot_status(api, old.id) == spb.SLOT_STATUS_AVAILABLE


async def test_reschedule_failures_leave_the_original_intact(api: Api) -> None:
    spec = await api.specialist()
    other_spec = await api.specialist(name="Dr. Other")
    old = await api.slot(spec.id, hours_from_now(5))
    taken = await api.slot(spec.id, hours_from_now(6))
    foreign = await api.slot(other_spec.id, hours_from_now(7))
    held = await api.hold(old.id)
    await api.hold(taken.id)

    async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "SLOT_UNAVAILABLE"):
        await _reschedule(api, held.id, taken.id)
    async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "SPECIALIST_MISMATCH"):
        await _reschedule(api, held.id, foreign.id)
    async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "SAME_SLOT"):
        await _reschedule(api, held.id, old.id)
    async with expect_failure(grpc.StatusCode.NOT_FOUND, "SLOT_NOT_FOUND"):
        await _reschedule(api, held.id, str(uuid.uuid4()))

    current = await api.appointments.GetAppointment(
        apb.GetAppointmentRequest(id=held.id), metadata=api.md
    )
    assert current.appointment.slot_id == old.id
    assert current.appointment.status == S.APPOINTMENT_STATUS_HOLD
    assert await _slot_status(api, old.id) == spb.SLOT_STATUS_HOLD


async def test_illegal_transitions_are_failed_precondition_naming_the_state(api: Api) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(-2))
    other = await api.slot(spec.id, hours_from_now(9))
    held = await api.hold(slot.id)
    await _confirm(api, held.id)
    await _no_show(api, held.id)

    cases = [
        ("confirm", lambda: _confirm(api, held.id)),
        ("cancel", lambda: _cancel(api, held.id)),
        ("mark_no_show", lambda: _no_show(api, held.id)),
        ("reschedule", lambda: _reschedule(api, held.id, other.id)),
    ]
    for transition, call in cases:
        async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "WRONG_STATE") as box:
            await call()
        assert box[0].metadata["status"] == "NO_SHOW", transition
        assert box[0].metadata["transition"] == transition
        assert "NO_SHOW" in box[0].message

    cancelled = await api.hold(other.id)
    await _cancel(api, cancelled.id)
    for call in (lambda: _confirm(api, cancelled.id), lambda: _cancel(api, cancelled.id)):
        async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "WRONG_STATE") as box:
            await call()
        assert box[0].metadata["status"] == "CANCELLED"


async def test_user_overlap_is_refused_and_can_be_turned_off(database_url: str) -> None:
    for check, expected in ((True, "USER_OVERLAP"), (False, None)):
        config = ServerConfig.for_tests(database_url, check_user_overlap=check)
        async with _running(config) as api:
            client, _ = await api.client()
            a = await api.slot(
                (await api.specialist()).id, hours_from_now(100 + (0 if check else 10))
            )
            b = await api.slot(
                (await api.specialist()).id,
                hours_from_now(100 + (0 if check else 10)),
            )
            await client.hold(a.id)
            if expected:
                async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, expected):
                    await client.hold(b.id)
            else:
                assert (await client.hold(b.id)).status == S.APPOINTMENT_STATUS_HOLD


@asynccontextmanager
async def _running(config: Config) -> AsyncIterator[Api]:
    server = BookingServer(config)
    await server.start()
    try:
        async with Api.connect(server) as api:
            yield api
    finally:
        await server.stop(grace=1)


async def test_an_expired_hold_is_reclaimed_by_the_next_hold(database_url: str) -> None:
    config = ServerConfig.for_tests(database_url, hold_ttl_seconds=0.3)
    async with _running(config) as api:
        spec = await api.specialist()
        slot = await api.slot(spec.id, hours_from_now(5))
        first, _ = await api.client()
        second, second_id = await api.client()
        stale = await first.hold(slot.id)
        async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "SLOT_UNAVAILABLE"):
            await second.hold(slot.id)
        await asyncio.sleep(0.5)

        fresh = await second.hold(slot.id)

        assert fresh.user_id == second_id
        async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "WRONG_STATE"):
            await _confirm(first, stale.id)
        assert await _event_types(database_url, stale.id) == ["HELD", "HOLD_EXPIRED"]
        assert await _event_types(database_url, fresh.id) == ["HELD"]


async def test_an_expired_hold_cannot_be_confirmed(database_url: str) -> None:
    config = ServerConfig.for_tests(database_url, hold_ttl_seconds=0.2)
    async with _running(config) as api:
        spec = await api.specialist()
        held = await api.hold((await api.slot(spec.id, hours_from_now(5))).id)
        await asyncio.sleep(0.3)
        async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "HOLD_EXPIRED"):
            await _confirm(api, held.id)


async def test_two_sweepers_on_one_database_release_each_hold_once(database_url: str) -> None:
    config = ServerConfig.for_tests(
        database_url, hold_ttl_seconds=0.5, sweep_interval_seconds=0.05, sweep_batch_size=7
    )
    async with _running(config) as api, _running(config) as _other:
        operator = api.as_(await api.make_token(Role.OPERATOR))
        spec = await api.specialist()
        users = await insert_clients(database_url, 60)
        slots = [await api.slot(spec.id, hours_from_now(200 + i)) for i in range(60)]
        held = await asyncio.gather(
            *(operator.hold(s.id, user_id=u) for s, u in zip(slots, users, strict=True))
        )
        for _ in range(100):
            rows = await fetch(
                database_url, "SELECT count(*) AS n FROM appointments WHERE status = 'HOLD'"
            )
            if rows[0]["n"] == 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the sweepers did not release every hold")

        expired = await fetch(
            database_url,
            "SELECT appointment_id FROM appointment_events WHERE event_type = 'HOLD_EXPIRED'",
        )
        per_appointment = Counter(str(r["appointment_id"]) for r in expired)
        assert per_appointment == {a.id: 1 for a in held}
        statuses = await fetch(database_url, "SELECT DISTINCT status FROM time_slots")
        assert [r["status"] for r in statuses] == ["AVAILABLE"]
