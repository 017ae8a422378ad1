"""Buffers: two live appointments of a specialist, in different slots, keep
the buffer after the first and the buffer before the second between them,
enforced by an exclusion constraint (storage/sql/buffers.sql)."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import datetime, timedelta

import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from booking.v1 import appointment_pb2 as apb
from booking.v1 import appointment_pb2_grpc
from booking.v1 import slot_pb2 as spb
from booking.v1 import specialist_pb2 as sppb
from booking.v1 import waitlist_pb2 as wpb
from storage.models import Role
from tests.population import fetch, insert_clients
from tests.support import Api, expect_failure, failure, hours_from_now, ts
from tests.test_concurrency import _race
from tests.test_waitlist import entry, wait_for

PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

# Pairs of live appointments of one specialist, in different slots, whose
# buffered ranges overlap: what appointments_buffers_apart forbids.
VIOLATIONS = """
    SELECT count(*) AS n FROM appointments a JOIN appointments b
      ON a.specialist_id = b.specialist_id AND a.id < b.id
     AND a.time_slot_id <> b.time_slot_id AND a.buffered_range && b.buffered_range
    WHERE a.status <> 'CANCELLED' AND b.status <> 'CANCELLED'
"""


async def _specialist(api: Api, before: int, after: int) -> sppb.Specialist:
    reply = await api.specialists.CreateSpecialist(
        sppb.CreateSpecialistRequest(
            full_name="Dr. Buffer",
            service_type="buffered",
            buffer_before_minutes=before,
            buffer_after_minutes=after,
        ),
        metadata=api.md,
    )
    return reply.specialist


async def _set_buffers(api: Api, specialist_id: str, before: int, after: int) -> None:
    await api.specialists.UpdateSpecialist(
        sppb.UpdateSpecialistRequest(
            specialist=sppb.Specialist(
                id=specialist_id, buffer_before_minutes=before, buffer_after_minutes=after
            ),
            update_mask=FieldMask(paths=["buffer_before_minutes", "buffer_after_minutes"]),
        ),
        metadata=api.md,
    )


def _base() -> datetime:
    return hours_from_now(48).replace(minute=0, second=0, microsecond=0)


async def _slots(api: Api, specialist_id: str, starts: list[int], minutes: int = 60) -> list[str]:
    """Slots starting `starts` minutes after the base hour."""
    base = _base()
    out = []
    for m in starts:
        start = base + timedelta(minutes=m)
        reply = await api.slots.CreateSlot(
            spb.CreateSlotRequest(
                specialist_id=specialist_id,
                start_time=ts(start),
                end_time=ts(start + timedelta(minutes=minutes)),
            ),
            metadata=api.md,
        )
        out.append(reply.slot.id)
    return out


async def test_a_hold_within_the_buffers_is_refused_with_the_blocking_window(api: Api) -> None:
    spec = await _specialist(api, before=10, after=15)
    assert (spec.buffer_before_minutes, spec.buffer_after_minutes) == (10, 15)
    # 10:00-11:00 held; 10-minute slots at 11:00 and 11:10 are too close
    # (15 after + 10 before), 11:25 is just far enough.
    (first,) = await _slots(api, spec.id, [0])
    adjacent, close, apart = await _slots(api, spec.id, [60, 70, 85], minutes=10)
    client, _ = await api.client()
    await client.hold(first)

    base = _base()
    for slot_id in (adjacent, close):
        async with expect_failure(PRECONDITION, "WITHIN_BUFFER") as box:
            await (await api.client())[0].hold(slot_id)
        assert box[0].metadata == {
            "slot_id": slot_id,
            "window_start_time": (base - timedelta(minutes=10)).isoformat(),
            "window_end_time": (base + timedelta(minutes=75)).isoformat(),
        }
    await (await api.client())[0].hold(apart)


async def test_holds_racing_into_a_buffer_from_both_sides_never_both_win(
    api: Api, database_url: str
) -> None:
    """Three back-to-back slots, 15 minutes of buffer on each side: the
    middle one excludes both neighbours, the outer two do not exclude each
    other. 48 clients race, 16 on each slot, in several rounds: every round
    ends with the middle alone or both outer ones, never anything closer."""
    operator = api.as_(await api.make_token(Role.OPERATOR))
    spec = await _specialist(api, before=15, after=15)
    users = await insert_clients(database_url, 48 * 4)
    for round_ in range(4):
        slots = await _slots(api, spec.id, [round_ * 600 + m for m in (0, 60, 120)])
        reasons: list[str] = []

        async def hold(
            channel: grpc.aio.Channel,
            i: int,
            slots: list[str] = slots,
            first: int = round_ * 48,
            reasons: list[str] = reasons,
        ) -> None:
            stub = appointment_pb2_grpc.AppointmentServiceStub(channel)
            try:
                await stub.HoldSlot(
                    apb.HoldSlotRequest(slot_id=slots[i % 3], user_id=users[first + i]),
                    metadata=operator.md,
                )
            except grpc.aio.AioRpcError as err:
                reasons.append(failure(err).reason)
                raise

        codes = Counter(await _race(api, 48, hold))
        assert set(codes) <= {grpc.StatusCode.OK, PRECONDITION}, codes
        assert set(reasons) <= {"SLOT_UNAVAILABLE", "WITHIN_BUFFER"}
        rows = await fetch(
            database_url,
            "SELECT time_slot_id::text AS slot FROM appointments"
            " WHERE time_slot_id = ANY($1::uuid[]) AND status <> 'CANCELLED'",
            [uuid.UUID(s) for s in slots],
        )
        held = sorted(slots.index(r["slot"]) for r in rows)
        assert held in ([1], [0, 2]), held
        assert codes[grpc.StatusCode.OK] == len(held)
    assert (await fetch(database_url, VIOLATIONS))[0]["n"] == 0


async def test_search_and_the_waitlist_never_offer_a_slot_a_buffer_blocks(api: Api) -> None:
    spec = await _specialist(api, before=0, after=30)
    (first,) = await _slots(api, spec.id, [0])
    holder, _ = await api.client()
    await holder.hold(first)
    window = (hours_from_now(1), hours_from_now(100))
    waiter_id = (await api.client())[1]
    waiting = await wait_for(api, waiter_id, *window, specialist_id=spec.id)

    # Created inside the held appointment's buffer: not offered, not found.
    blocked, free = await _slots(api, spec.id, [60, 120])
    assert (await entry(api, waiting.id)).status == wpb.WAITLIST_ENTRY_STATUS_OFFERED
    offered = await api.appointments.GetAppointment(
        apb.GetAppointmentRequest(id=(await entry(api, waiting.id)).appointment_id),
        metadata=api.md,
    )
    assert offered.appointment.slot_id == free
    reply = await api.slots.SearchAvailableSlots(
        spb.SearchAvailableSlotsRequest(
            specialist_ids=[spec.id],
            window_start_time=ts(window[0]),
            window_end_time=ts(window[1]),
        ),
        metadata=api.md,
    )
    assert [a.slot.id for a in reply.available_slots] == []
    assert blocked not in [a.slot.id for a in reply.available_slots]


async def test_a_clients_search_leaves_out_slots_overlapping_its_own_appointments(
    api: Api,
) -> None:
    a = await api.specialist()
    b = await api.specialist()
    (mine,) = await _slots(api, a.id, [0])
    (other,) = await _slots(api, b.id, [30])
    (later,) = await _slots(api, b.id, [120])
    client, _ = await api.client()
    await client.hold(mine)
    request = spb.SearchAvailableSlotsRequest(
        specialist_ids=[a.id, b.id],
        window_start_time=ts(hours_from_now(1)),
        window_end_time=ts(hours_from_now(100)),
    )
    found = await client.slots.SearchAvailableSlots(request, metadata=client.md)
    assert [s.slot.id for s in found.available_slots] == [later]
    # Staff search for anyone: the overlap is the client's, not theirs.
    found = await api.slots.SearchAvailableSlots(request, metadata=api.md)
    assert [s.slot.id for s in found.available_slots] == [other, later]
    async with expect_failure(PRECONDITION, "USER_OVERLAP"):
        await client.hold(other)


async def test_changing_buffers_keeps_existing_appointments_and_binds_new_holds(
    api: Api, database_url: str
) -> None:
    spec = await _specialist(api, before=0, after=0)
    early, first, second = await _slots(api, spec.id, [-60, 0, 60])
    holds = [await (await api.client())[0].hold(s) for s in (first, second)]
    await _set_buffers(api, spec.id, 15, 15)
    # Both stay, and are confirmed as usual.
    for h in holds:
        await api.appointments.ConfirmAppointment(
            apb.ConfirmAppointmentRequest(id=h.id), metadata=api.md
        )
    async with expect_failure(PRECONDITION, "WITHIN_BUFFER"):
        await (await api.client())[0].hold(early)
    assert (await fetch(database_url, VIOLATIONS))[0]["n"] == 0


async def test_a_lapsed_hold_in_the_way_is_reclaimed(api: Api, database_url: str) -> None:
    spec = await _specialist(api, before=0, after=30)
    first, second = await _slots(api, spec.id, [0, 60])
    lapsed = await (await api.client())[0].hold(first)
    await fetch(
        database_url,
        "UPDATE appointments SET expires_at = now() - interval '1 second' WHERE id = $1",
        uuid.UUID(lapsed.id),
    )
    await (await api.client())[0].hold(second)
    rows = await fetch(
        database_url,
        "SELECT event_type FROM appointment_events WHERE appointment_id = $1 ORDER BY seq",
        uuid.UUID(lapsed.id),
    )
    assert [r["event_type"] for r in rows] == ["HELD", "HOLD_EXPIRED"]


async def test_rescheduling_into_a_buffer_is_refused(api: Api) -> None:
    spec = await _specialist(api, before=0, after=30)
    first, far, near = await _slots(api, spec.id, [0, 240, 60])
    await (await api.client())[0].hold(first)
    client, _ = await api.client()
    mine = await client.hold(far)
    async with expect_failure(PRECONDITION, "WITHIN_BUFFER"):
        await client.appointments.RescheduleAppointment(
            apb.RescheduleAppointmentRequest(id=mine.id, new_slot_id=near), metadata=client.md
        )


async def test_buffers_cleared_to_zero_still_guard_the_appointments_taken_with_them(
    api: Api, database_url: str
) -> None:
    # Holds skip the buffer probe for a specialist whose buffers were never
    # used (specialists.buffers_used); one whose buffers went back to 0
    # still has appointments with wide ranges, so it must keep probing: the
    # refusal stays WITHIN_BUFFER with its window, not a bare exclusion.
    spec = await _specialist(api, before=0, after=0)
    never = await fetch(
        database_url, "SELECT buffers_used FROM specialists WHERE id = $1", uuid.UUID(spec.id)
    )
    assert never[0]["buffers_used"] is False
    first, after = await _slots(api, spec.id, [0, 60])
    await _set_buffers(api, spec.id, 0, 30)
    await (await api.client())[0].hold(first)
    await _set_buffers(api, spec.id, 0, 0)
    # Even a direct write cannot clear it.
    await fetch(
        database_url,
        "UPDATE specialists SET buffers_used = false WHERE id = $1",
        uuid.UUID(spec.id),
    )
    used = await fetch(
        database_url, "SELECT buffers_used FROM specialists WHERE id = $1", uuid.UUID(spec.id)
    )
    assert used[0]["buffers_used"] is True
    base = _base()
    async with expect_failure(PRECONDITION, "WITHIN_BUFFER") as box:
        await (await api.client())[0].hold(after)
    assert box[0].metadata["window_end_time"] == (base + timedelta(minutes=90)).isoformat()
    assert (await fetch(database_url, VIOLATIONS))[0]["n"] == 0
