"""SlotService end to end over a real gRPC channel and a real PostgreSQL:
success paths, overlap rules, atomic batches, soft deletes, filters and
pagination."""

from __future__ import annotations

import random
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from booking.v1 import appointment_pb2 as apb
from booking.v1 import slot_pb2 as spb
from booking.v1 import specialist_pb2 as sppb
from tests.support import Api, expect_failure, hours_from_now, ts

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXISTS = grpc.StatusCode.ALREADY_EXISTS
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
MISSING_ID = "00000000-0000-4000-8000-000000000000"


def _req(specialist_id: str, start: datetime, minutes: int = 30) -> spb.CreateSlotRequest:
    return spb.CreateSlotRequest(
        specialist_id=specialist_id,
        start_time=ts(start),
        end_time=ts(start + timedelta(minutes=minutes)),
    )


def _when(t: Timestamp) -> datetime:
    return t.ToDatetime(tzinfo=UTC)


async def _list(api: Api, **filters: Any) -> spb.ListSlotsResponse:
    return await api.slots.ListSlots(spb.ListSlotsRequest(**filters), metadata=api.md)


async def _walk(api: Api, page_size: int, **filters: Any) -> tuple[list[spb.Slot], int]:
    """Every slot matching `filters`, following next_page_token; and the page count."""
    items: list[spb.Slot] = []
    token, pages = "", 0
    while True:
        page = await _list(api, page_size=page_size, page_token=token, **filters)
        pages += 1
        assert len(page.slots) <= page_size
        items.extend(page.slots)
        token = page.next_page_token
        if not token:
            return items, pages
        assert pages < 100, "pagination does not terminate"


def _ids(slots: Iterable[Any]) -> list[str]:
    return [s.id for s in slots]


async def _deactivate(api: Api, specialist_id: str) -> None:
    await api.specialists.UpdateSpecialist(
        sppb.UpdateSpecialistRequest(
            specialist=sppb.Specialist(id=specialist_id, active=False),
            update_mask=FieldMask(paths=["active"]),
        ),
        metadata=api.md,
    )


# --- success paths ---------------------------------------------------------


async def test_create_slot_returns_an_available_slot_with_the_requested_times(api: Api) -> None:
    spec = await api.specialist()
    start = hours_from_now(24)
    reply = await api.slots.CreateSlot(_req(spec.id, start, 45), metadata=api.md)
    slot = reply.slot
    assert slot.id and slot.specialist_id == spec.id
    assert slot.status == spb.SLOT_STATUS_AVAILABLE
    assert _when(slot.start_time) == start
    assert _when(slot.end_time) == start + timedelta(minutes=45)
    assert slot.HasField("create_time")
    got = await api.slots.GetSlot(spb.GetSlotRequest(id=slot.id), metadata=api.md)
    assert got.slot == slot


async def test_slot_times_keep_microseconds_and_drop_extra_nanos(api: Api) -> None:
    spec = await api.specialist()
    start = ts(hours_from_now(24))
    start.nanos = 123_456_789
    end = ts(hours_from_now(25))
    reply = await api.slots.CreateSlot(
        spb.CreateSlotRequest(specialist_id=spec.id, start_time=start, end_time=end),
        metadata=api.md,
    )
    assert reply.slot.start_time.seconds == start.seconds
    assert reply.slot.start_time.nanos == 123_456_000


async def test_batch_create_slots_returns_all_slots_in_request_order(api: Api) -> None:
    spec = await api.specialist()
    starts = [hours_from_now(30), hours_from_now(26), hours_from_now(28)]
    reply = await api.slots.BatchCreateSlots(
        spb.BatchCreateSlotsRequest(requests=[_req(spec.id, s) for s in starts]),
        metadata=api.md,
    )
    assert [_when(s.start_time) for s in reply.slots] == starts
    assert all(s.status == spb.SLOT_STATUS_AVAILABLE for s in reply.slots)
    assert len(set(_ids(reply.slots))) == 3
    listed = await _list(api, specialist_id=spec.id)
    assert sorted(_ids(listed.slots)) == sorted(_ids(reply.slots))


async def test_batch_create_slots_accepts_several_specialists(api: Api) -> None:
    a, b = await api.specialist("A"), await api.specialist("B")
    start = hours_from_now(24)
    reply = await api.slots.BatchCreateSlots(
        spb.BatchCreateSlotsRequest(requests=[_req(a.id, start), _req(b.id, start)]),
        metadata=api.md,
    )
    assert [s.specialist_id for s in reply.slots] == [a.id, b.id]


async def test_delete_slot_then_get_slot_is_not_found(api: Api) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(24))
    await api.slots.DeleteSlot(spb.DeleteSlotRequest(id=slot.id), metadata=api.md)
    async with expect_failure(NOT_FOUND, "SLOT_NOT_FOUND"):
        await api.slots.GetSlot(spb.GetSlotRequest(id=slot.id), metadata=api.md)
    assert _ids((await _list(api, specialist_id=spec.id)).slots) == []
    async with expect_failure(NOT_FOUND, "SLOT_NOT_FOUND"):
        await api.slots.DeleteSlot(spb.DeleteSlotRequest(id=slot.id), metadata=api.md)


async def test_a_deleted_slot_no_longer_blocks_an_overlapping_slot(api: Api) -> None:
    spec = await api.specialist()
    start = hours_from_now(24)
    old = await api.slot(spec.id, start, 60)
    await api.slots.DeleteSlot(spb.DeleteSlotRequest(id=old.id), metadata=api.md)
    new = await api.slot(spec.id, start + timedelta(minutes=15), 30)
    assert new.id != old.id
    assert _ids((await _list(api, specialist_id=spec.id)).slots) == [new.id]


async def test_a_deleted_slot_cannot_be_held(api: Api) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(24))
    await api.slots.DeleteSlot(spb.DeleteSlotRequest(id=slot.id), metadata=api.md)
    client, _ = await api.client()
    async with expect_failure(NOT_FOUND, "SLOT_NOT_FOUND"):
        await client.hold(slot.id)


# --- overlaps: ALREADY_EXISTS ----------------------------------------------


async def test_overlapping_slot_for_the_same_specialist_is_already_exists(api: Api) -> None:
    spec = await api.specialist()
    start = hours_from_now(24)
    await api.slot(spec.id, start, 60)
    for offset, minutes in [(0, 60), (-15, 30), (45, 30), (15, 15), (-30, 120)]:
        async with expect_failure(EXISTS, "SLOT_OVERLAP"):
            await api.slot(spec.id, start + timedelta(minutes=offset), minutes)
    assert len((await _list(api, specialist_id=spec.id)).slots) == 1


async def test_slot_overlap_error_names_the_specialist(api: Api) -> None:
    spec = await api.specialist()
    start = hours_from_now(24)
    await api.slot(spec.id, start, 60)
    async with expect_failure(EXISTS, "SLOT_OVERLAP") as box:
        await api.slot(spec.id, start, 60)
    assert box[0].metadata.get("specialist_id") == spec.id
    assert box[0].message == (f"specialist {spec.id} already has a slot overlapping this time")


async def test_adjacent_slots_are_allowed(api: Api) -> None:
    spec = await api.specialist()
    start = hours_from_now(24)
    middle = await api.slot(spec.id, start, 30)
    after = await api.slot(spec.id, start + timedelta(minutes=30), 30)
    before = await api.slot(spec.id, start - timedelta(minutes=30), 30)
    listed = await _list(api, specialist_id=spec.id)
    assert _ids(listed.slots) == [before.id, middle.id, after.id]


async def test_adjacent_slots_in_one_batch_are_allowed(api: Api) -> None:
    spec = await api.specialist()
    start = hours_from_now(24)
    reply = await api.slots.BatchCreateSlots(
        spb.BatchCreateSlotsRequest(
            requests=[_req(spec.id, start + timedelta(minutes=30 * i)) for i in range(4)]
        ),
        metadata=api.md,
    )
    assert len(reply.slots) == 4


async def test_same_time_for_different_specialists_is_allowed(api: Api) -> None:
    a, b = await api.specialist("A"), await api.specialist("B")
    start = hours_from_now(24)
    await api.slot(a.id, start)
    slot_b = await api.slot(b.id, start)
    assert slot_b.specialist_id == b.id


async def test_batch_whose_slots_overlap_each_other_is_already_exists_and_writes_nothing(
    api: Api,
) -> None:
    spec = await api.specialist()
    start = hours_from_now(24)
    requests = [
        _req(spec.id, start + timedelta(hours=5)),
        _req(spec.id, start),
        _req(spec.id, start + timedelta(minutes=15)),
    ]
    async with expect_failure(EXISTS, "SLOT_OVERLAP"):
        await api.slots.BatchCreateSlots(
            spb.BatchCreateSlotsRequest(requests=requests), metadata=api.md
        )
    assert (await _list(api)).slots == []


async def test_batch_overlapping_an_existing_slot_writes_nothing(api: Api) -> None:
    spec = await api.specialist()
    start = hours_from_now(24)
    existing = await api.slot(spec.id, start)
    async with expect_failure(EXISTS, "SLOT_OVERLAP"):
        await api.slots.BatchCreateSlots(
            spb.BatchCreateSlotsRequest(
                requests=[_req(spec.id, start + timedelta(hours=2)), _req(spec.id, start)]
            ),
            metadata=api.md,
        )
    assert _ids((await _list(api)).slots) == [existing.id]


async def test_batch_with_an_unknown_specialist_is_not_found_and_writes_nothing(
    api: Api,
) -> None:
    spec = await api.specialist()
    start = hours_from_now(24)
    async with expect_failure(NOT_FOUND, "SPECIALIST_NOT_FOUND"):
        await api.slots.BatchCreateSlots(
            spb.BatchCreateSlotsRequest(requests=[_req(spec.id, start), _req(MISSING_ID, start)]),
            metadata=api.md,
        )
    assert (await _list(api)).slots == []


async def test_batch_with_one_invalid_slot_names_it_and_writes_nothing(api: Api) -> None:
    spec = await api.specialist()
    start = hours_from_now(24)
    reversed_ = spb.CreateSlotRequest(
        specialist_id=spec.id, start_time=ts(start + timedelta(hours=3)), end_time=ts(start)
    )
    async with expect_failure(INVALID) as box:
        await api.slots.BatchCreateSlots(
            spb.BatchCreateSlotsRequest(requests=[_req(spec.id, start), reversed_]),
            metadata=api.md,
        )
    assert box[0].violations == ["requests[1].end_time"]
    assert (await _list(api)).slots == []


async def test_batch_of_1000_is_accepted_and_1001_is_invalid_argument(api: Api) -> None:
    spec = await api.specialist()
    base = hours_from_now(24)
    requests = [_req(spec.id, base + timedelta(minutes=30 * i)) for i in range(1001)]
    async with expect_failure(INVALID) as box:
        await api.slots.BatchCreateSlots(
            spb.BatchCreateSlotsRequest(requests=requests), metadata=api.md
        )
    assert box[0].violations == ["requests"]
    assert (await _list(api)).slots == []
    reply = await api.slots.BatchCreateSlots(
        spb.BatchCreateSlotsRequest(requests=requests[:1000]), metadata=api.md
    )
    assert len(reply.slots) == 1000
    async with expect_failure(INVALID) as box:
        await api.slots.BatchCreateSlots(spb.BatchCreateSlotsRequest(), metadata=api.md)
    assert box[0].violations == ["requests"]


# --- NOT_FOUND / FAILED_PRECONDITION ---------------------------------------


async def test_get_or_delete_unknown_slot_is_not_found(api: Api) -> None:
    async with expect_failure(NOT_FOUND, "SLOT_NOT_FOUND") as box:
        await api.slots.GetSlot(spb.GetSlotRequest(id=MISSING_ID), metadata=api.md)
    assert box[0].metadata.get("id") == MISSING_ID
    async with expect_failure(NOT_FOUND, "SLOT_NOT_FOUND"):
        await api.slots.DeleteSlot(spb.DeleteSlotRequest(id=MISSING_ID), metadata=api.md)


async def test_create_slot_for_unknown_specialist_is_not_found(api: Api) -> None:
    async with expect_failure(NOT_FOUND, "SPECIALIST_NOT_FOUND"):
        await api.slot(MISSING_ID, hours_from_now(24))


async def test_create_slot_for_inactive_specialist_is_failed_precondition(api: Api) -> None:
    spec = await api.specialist()
    await _deactivate(api, spec.id)
    async with expect_failure(PRECONDITION, "SPECIALIST_INACTIVE"):
        await api.slot(spec.id, hours_from_now(24))
    async with expect_failure(PRECONDITION, "SPECIALIST_INACTIVE"):
        await api.slots.BatchCreateSlots(
            spb.BatchCreateSlotsRequest(requests=[_req(spec.id, hours_from_now(30))]),
            metadata=api.md,
        )
    assert (await _list(api)).slots == []


async def test_deleting_a_held_slot_is_failed_precondition_and_keeps_it(api: Api) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(24))
    client, _ = await api.client()
    await client.hold(slot.id)
    async with expect_failure(PRECONDITION, "SLOT_NOT_AVAILABLE") as box:
        await api.slots.DeleteSlot(spb.DeleteSlotRequest(id=slot.id), metadata=api.md)
    assert box[0].metadata.get("status") == "HOLD"
    got = await api.slots.GetSlot(spb.GetSlotRequest(id=slot.id), metadata=api.md)
    assert got.slot.status == spb.SLOT_STATUS_HOLD


async def test_deleting_a_booked_slot_is_failed_precondition(api: Api) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(24))
    client, _ = await api.client()
    held = await client.hold(slot.id)
    await client.appointments.ConfirmAppointment(
        apb.ConfirmAppointmentRequest(id=held.id), metadata=client.md
    )
    async with expect_failure(PRECONDITION, "SLOT_NOT_AVAILABLE"):
        await api.slots.DeleteSlot(spb.DeleteSlotRequest(id=slot.id), metadata=api.md)
    got = await api.slots.GetSlot(spb.GetSlotRequest(id=slot.id), metadata=api.md)
    assert got.slot.status == spb.SLOT_STATUS_BOOKED


async def test_a_slot_freed_by_cancelling_can_be_deleted(api: Api) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(24))
    client, _ = await api.client()
    held = await client.hold(slot.id)
    await client.appointments.CancelAppointment(
        apb.CancelAppointmentRequest(id=held.id), metadata=client.md
    )
    await api.slots.DeleteSlot(spb.DeleteSlotRequest(id=slot.id), metadata=api.md)
    async with expect_failure(NOT_FOUND, "SLOT_NOT_FOUND"):
        await api.slots.GetSlot(spb.GetSlotRequest(id=slot.id), metadata=api.md)


# --- ListSlots filters -----------------------------------------------------


async def test_list_slots_filters_by_specialist(api: Api) -> None:
    a, b = await api.specialist("A"), await api.specialist("B")
    t = hours_from_now(24)
    a1, b1 = await api.slot(a.id, t), await api.slot(b.id, t)
    a2 = await api.slot(a.id, t + timedelta(hours=1))
    assert _ids((await _list(api, specialist_id=a.id)).slots) == [a1.id, a2.id]
    assert _ids((await _list(api, specialist_id=b.id)).slots) == [b1.id]
    assert _ids((await _list(api, specialist_id=MISSING_ID)).slots) == []
    assert len((await _list(api)).slots) == 3


async def test_list_slots_filters_by_time_window_with_exclusive_edges(api: Api) -> None:
    spec = await api.specialist()
    t = hours_from_now(24)
    s1 = await api.slot(spec.id, t, 30)  # [t, t+30m)
    s2 = await api.slot(spec.id, t + timedelta(hours=1), 30)  # [t+1h, t+1h30m)
    s3 = await api.slot(spec.id, t + timedelta(hours=2), 30)  # [t+2h, t+2h30m)

    async def window(start: datetime | None, end: datetime | None) -> list[str]:
        filters: dict[str, Any] = {"specialist_id": spec.id}
        if start is not None:
            filters["window_start_time"] = ts(start)
        if end is not None:
            filters["window_end_time"] = ts(end)
        return _ids((await _list(api, **filters)).slots)

    # A slot ending exactly at window_start, or starting exactly at window_end, is outside.
    assert await window(t + timedelta(minutes=30), None) == [s2.id, s3.id]
    assert await window(None, t + timedelta(hours=2)) == [s1.id, s2.id]
    assert await window(t + timedelta(minutes=30), t + timedelta(hours=2)) == [s2.id]
    # Partial overlap at either edge is inside.
    assert await window(t + timedelta(minutes=15), t + timedelta(minutes=75)) == [s1.id, s2.id]
    assert await window(t + timedelta(hours=3), None) == []
    assert await window(None, None) == [s1.id, s2.id, s3.id]


async def test_list_slots_filters_by_status(api: Api) -> None:
    spec = await api.specialist()
    t = hours_from_now(24)
    free = await api.slot(spec.id, t)
    held = await api.slot(spec.id, t + timedelta(hours=1))
    booked = await api.slot(spec.id, t + timedelta(hours=2))
    client, _ = await api.client()
    await client.hold(held.id)
    appointment = await client.hold(booked.id)
    await client.appointments.ConfirmAppointment(
        apb.ConfirmAppointmentRequest(id=appointment.id), metadata=client.md
    )
    by_status = {
        status: _ids((await _list(api, specialist_id=spec.id, status=status)).slots)
        for status in (spb.SLOT_STATUS_AVAILABLE, spb.SLOT_STATUS_HOLD, spb.SLOT_STATUS_BOOKED)
    }
    assert by_status == {
        spb.SLOT_STATUS_AVAILABLE: [free.id],
        spb.SLOT_STATUS_HOLD: [held.id],
        spb.SLOT_STATUS_BOOKED: [booked.id],
    }


# --- pagination ------------------------------------------------------------


async def test_walking_slot_pages_returns_every_slot_once_in_start_order(api: Api) -> None:
    a, b = await api.specialist("A"), await api.specialist("B")
    base = hours_from_now(24)
    offsets = list(range(6))
    random.Random(7).shuffle(offsets)  # creation order differs from start order
    requests = [_req(s.id, base + timedelta(hours=h)) for h in offsets for s in (a, b)]
    await api.slots.BatchCreateSlots(
        spb.BatchCreateSlotsRequest(requests=requests), metadata=api.md
    )
    everything = (await _list(api, page_size=1000)).slots
    assert len(everything) == 12
    expected = sorted(everything, key=lambda s: (_when(s.start_time), s.id))
    assert _ids(everything) == _ids(expected)
    for size in (1, 3, 5, 12):
        walked, pages = await _walk(api, size)
        assert _ids(walked) == _ids(expected), f"page_size={size}"
        assert pages == -(-12 // size), "no empty trailing page"


async def test_walking_slot_pages_with_filters_keeps_the_filters(api: Api) -> None:
    a, b = await api.specialist("A"), await api.specialist("B")
    base = hours_from_now(24)
    await api.slots.BatchCreateSlots(
        spb.BatchCreateSlotsRequest(
            requests=[_req(s.id, base + timedelta(hours=h)) for h in range(7) for s in (a, b)]
        ),
        metadata=api.md,
    )
    window = {
        "window_start_time": ts(base + timedelta(hours=1)),
        "window_end_time": ts(base + timedelta(hours=6)),
    }
    walked, _ = await _walk(api, 2, specialist_id=a.id, **window)
    assert [s.specialist_id for s in walked] == [a.id] * 5
    assert [_when(s.start_time) for s in walked] == [base + timedelta(hours=h) for h in range(1, 6)]


async def test_list_slots_page_size_zero_means_fifty(api: Api) -> None:
    spec = await api.specialist()
    base = hours_from_now(24)
    await api.slots.BatchCreateSlots(
        spb.BatchCreateSlotsRequest(
            requests=[_req(spec.id, base + timedelta(minutes=30 * i)) for i in range(60)]
        ),
        metadata=api.md,
    )
    first = await _list(api, page_size=0)
    assert len(first.slots) == 50
    assert first.next_page_token
    rest = await _list(api, page_size=0, page_token=first.next_page_token)
    assert len(rest.slots) == 10
    assert rest.next_page_token == ""


async def test_list_slots_page_size_above_1000_is_coerced_to_1000(api: Api) -> None:
    spec = await api.specialist()
    base = hours_from_now(24)
    await api.slots.BatchCreateSlots(
        spb.BatchCreateSlotsRequest(
            requests=[_req(spec.id, base + timedelta(minutes=30 * i)) for i in range(1000)]
        ),
        metadata=api.md,
    )
    last = await api.slot(spec.id, base - timedelta(hours=1))
    for size in (1001, 2**31 - 1):
        page = await _list(api, page_size=size)
        assert len(page.slots) == 1000
        assert page.next_page_token
    rest = await _list(api, page_size=1001, page_token=page.next_page_token)
    assert len(rest.slots) == 1
    assert rest.next_page_token == ""
    assert page.slots[0].id == last.id  # earliest start comes first


async def test_slot_page_token_reused_with_changed_filters_is_invalid_argument(api: Api) -> None:
    a, b = await api.specialist("A"), await api.specialist("B")
    base = hours_from_now(24)
    for h in range(3):
        await api.slot(a.id, base + timedelta(hours=h))
    first = await _list(api, page_size=1, specialist_id=a.id)
    token = first.next_page_token
    assert token
    changed: list[dict[str, Any]] = [
        {"specialist_id": b.id},
        {},
        {"specialist_id": a.id, "status": spb.SLOT_STATUS_AVAILABLE},
        {"specialist_id": a.id, "window_start_time": ts(base)},
        {"specialist_id": a.id, "window_end_time": ts(base + timedelta(days=1))},
    ]
    for filters in changed:
        async with expect_failure(INVALID) as box:
            await _list(api, page_size=1, page_token=token, **filters)
        assert box[0].violations == ["page_token"], filters
    # The same filters (page_size may change) still work.
    second = await _list(api, page_size=5, page_token=token, specialist_id=a.id)
    assert len(second.slots) == 2
    assert first.slots[0].id not in _ids(second.slots)
