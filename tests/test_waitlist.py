"""The waitlist end to end over gRPC: entries, offers made in the
transaction that frees or creates a slot, their order and matching, what
confirming, declining and lapsing an offer does, and the rules of the API
(who may do what, validation, request ids). Concurrency is in
test_waitlist_concurrency.py."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from booking.v1 import appointment_pb2 as apb
from booking.v1 import slot_pb2 as spb
from booking.v1 import user_pb2 as upb
from booking.v1 import waitlist_pb2 as wpb
from service.config import Config, ConfigError
from storage import appointments as appointment_store
from storage import waitlist as waitlist_store
from tests.support import Api, expect_failure, hours_from_now, ts

NORMAL = apb.APPOINTMENT_PRIORITY_NORMAL
VIP = apb.APPOINTMENT_PRIORITY_VIP
URGENT = apb.APPOINTMENT_PRIORITY_URGENT
ACTIVE = wpb.WAITLIST_ENTRY_STATUS_ACTIVE
OFFERED = wpb.WAITLIST_ENTRY_STATUS_OFFERED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def wait_for(
    api: Api,
    user_id: str,
    start: datetime,
    end: datetime,
    *,
    specialist_id: str = "",
    service_type: str = "",
    priority: apb.AppointmentPriority.ValueType = NORMAL,
    **kw: Any,
) -> wpb.WaitlistEntry:
    """An entry created by the ADMIN `api` for `user_id`."""
    target: dict[str, Any] = (
        {"specialist_id": specialist_id} if specialist_id else {"service_type": service_type}
    )
    reply = await api.waitlist.CreateWaitlistEntry(
        wpb.CreateWaitlistEntryRequest(
            user_id=user_id,
            window_start_time=ts(start),
            window_end_time=ts(end),
            priority=priority,
            **target,
            **kw,
        ),
        metadata=api.md,
    )
    return reply.waitlist_entry


async def entry(api: Api, entry_id: str) -> wpb.WaitlistEntry:
    reply = await api.waitlist.GetWaitlistEntry(
        wpb.GetWaitlistEntryRequest(id=entry_id), metadata=api.md
    )
    return reply.waitlist_entry


async def appointment(api: Api, appointment_id: str) -> apb.Appointment:
    reply = await api.appointments.GetAppointment(
        apb.GetAppointmentRequest(id=appointment_id), metadata=api.md
    )
    return reply.appointment


async def booked(api: Api, slot_id: str) -> apb.Appointment:
    """The slot held and confirmed for a fresh client."""
    _, owner_id = await api.client()
    held = await api.hold(slot_id, user_id=owner_id)
    await api.appointments.ConfirmAppointment(
        apb.ConfirmAppointmentRequest(id=held.id), metadata=api.md
    )
    return held


async def cancel(api: Api, appointment_id: str) -> apb.Appointment:
    reply = await api.appointments.CancelAppointment(
        apb.CancelAppointmentRequest(id=appointment_id), metadata=api.md
    )
    return reply.appointment


async def offers(api: Api) -> list[apb.AppointmentEvent]:
    """Every HELD event that is a waitlist offer, oldest first."""
    reply = await api.appointments.ListAppointmentEvents(
        apb.ListAppointmentEventsRequest(
            filter=apb.AppointmentEventFilter(types=[apb.APPOINTMENT_EVENT_TYPE_HELD]),
            page_size=1000,
        ),
        metadata=api.md,
    )
    return [e for e in reply.events if e.waitlist_entry_id]


async def test_a_cancelled_booking_goes_to_the_waiter_who_confirms_it(api: Api) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(30))
    taken = await booked(api, slot.id)
    waiter, waiter_id = await api.client()
    joined = await waiter.waitlist.CreateWaitlistEntry(
        wpb.CreateWaitlistEntryRequest(
            specialist_id=spec.id,
            window_start_time=ts(hours_from_now(29)),
            window_end_time=ts(hours_from_now(32)),
        ),
        metadata=waiter.md,
    )
    mine = joined.waitlist_entry
    assert (mine.user_id, mine.status, mine.priority) == (waiter_id, ACTIVE, NORMAL)
    assert mine.specialist_id == spec.id and mine.WhichOneof("target") == "specialist_id"

    before = datetime.now(UTC)
    await cancel(api, taken.id)

    offered = await entry(waiter, mine.id)
    assert offered.status == OFFERED
    held = await appointment(waiter, offered.appointment_id)
    assert (held.user_id, held.slot_id, held.status) == (
        waiter_id,
        slot.id,
        apb.APPOINTMENT_STATUS_HOLD,
    )
    assert held.priority == NORMAL
    # The offer lasts the waitlist offer TTL (15 minutes by default), not a hold's 5.
    ttl = held.expire_time.ToDatetime(tzinfo=UTC) - before
    assert timedelta(minutes=14) < ttl <= timedelta(minutes=15, seconds=5)
    (event,) = await offers(api)
    assert event.waitlist_entry_id == mine.id
    assert event.appointment.id == held.id and event.actor_id == ""

    await waiter.appointments.ConfirmAppointment(
        apb.ConfirmAppointmentRequest(id=held.id), metadata=waiter.md
    )
    assert (await entry(waiter, mine.id)).status == wpb.WAITLIST_ENTRY_STATUS_FULFILLED
    slot_now = await api.slots.GetSlot(spb.GetSlotRequest(id=slot.id), metadata=api.md)
    assert slot_now.slot.status == spb.SLOT_STATUS_BOOKED


async def test_urgent_before_vip_before_normal_then_first_come(api: Api) -> None:
    spec = await api.specialist()
    start = hours_from_now(40)
    slots = [await api.slot(spec.id, start + timedelta(minutes=30 * i)) for i in range(5)]
    bookings = [await booked(api, s.id) for s in slots]
    window = (start - timedelta(hours=1), start + timedelta(hours=5))
    order = [NORMAL, VIP, URGENT, NORMAL, URGENT]
    entries = []
    for priority in order:
        _, user_id = await api.client()
        entries.append(
            await wait_for(api, user_id, *window, specialist_id=spec.id, priority=priority)
        )

    for booking in bookings:
        await cancel(api, booking.id)

    got = [e.waitlist_entry_id for e in await offers(api)]
    expected = [entries[i].id for i in (2, 4, 1, 0, 3)]
    assert got == expected
    for e, priority in zip(entries, order, strict=True):
        offered = await entry(api, e.id)
        assert (await appointment(api, offered.appointment_id)).priority == priority


async def test_the_slot_must_lie_in_the_window_and_match_specialist_or_service_type(
    api: Api,
) -> None:
    dentist = await api.specialist("Dr. A", "dentist")
    other_dentist = await api.specialist("Dr. B", "dentist")
    surgeon = await api.specialist("Dr. C", "surgeon")
    start = hours_from_now(50)
    _, u1 = await api.client()
    _, u2 = await api.client()
    _, u3 = await api.client()
    _, u4 = await api.client()
    # Ends half an hour too early for the slot; wrong specialist; wrong type.
    too_short = await wait_for(
        api, u1, start, start + timedelta(minutes=20), specialist_id=dentist.id
    )
    wrong_spec = await wait_for(
        api, u2, start, start + timedelta(hours=1), specialist_id=other_dentist.id
    )
    wrong_type = await wait_for(api, u3, start, start + timedelta(hours=1), service_type="surgeon")
    by_type = await wait_for(api, u4, start, start + timedelta(hours=1), service_type="dentist")

    created = await api.slot(dentist.id, start)
    assert created.status == spb.SLOT_STATUS_HOLD
    assert (await entry(api, by_type.id)).status == OFFERED
    for e in (too_short, wrong_spec, wrong_type):
        assert (await entry(api, e.id)).status == ACTIVE
    # The surgeon's new slot goes to the surgeon waiter.
    await api.slot(surgeon.id, start)
    assert (await entry(api, wrong_type.id)).status == OFFERED


async def test_inactive_users_and_users_with_an_overlapping_appointment_are_passed_over(
    api: Api,
) -> None:
    spec = await api.specialist()
    other = await api.specialist("Dr. Other")
    start = hours_from_now(60)
    window = (start - timedelta(hours=1), start + timedelta(hours=2))
    _, gone = await api.client()
    _, busy = await api.client()
    _, free = await api.client()
    urgent_gone = await wait_for(api, gone, *window, specialist_id=spec.id, priority=URGENT)
    urgent_busy = await wait_for(api, busy, *window, specialist_id=spec.id, priority=URGENT)
    normal_free = await wait_for(api, free, *window, specialist_id=spec.id)
    await api.users.UpdateUser(
        upb.UpdateUserRequest(
            user=upb.User(id=gone, active=False), update_mask=FieldMask(paths=["active"])
        ),
        metadata=api.md,
    )
    await api.hold((await api.slot(other.id, start + timedelta(minutes=15))).id, user_id=busy)

    await api.slot(spec.id, start)

    assert (await entry(api, normal_free.id)).status == OFFERED
    assert (await entry(api, urgent_gone.id)).status == ACTIVE
    assert (await entry(api, urgent_busy.id)).status == ACTIVE


async def test_new_slots_in_a_batch_are_offered_in_order_and_come_back_held(api: Api) -> None:
    spec = await api.specialist()
    start = hours_from_now(70)
    _, first = await api.client()
    _, second = await api.client()
    e1 = await wait_for(api, first, start, start + timedelta(hours=3), specialist_id=spec.id)
    e2 = await wait_for(api, second, start, start + timedelta(hours=3), specialist_id=spec.id)
    reply = await api.slots.BatchCreateSlots(
        spb.BatchCreateSlotsRequest(
            requests=[
                spb.CreateSlotRequest(
                    specialist_id=spec.id,
                    start_time=ts(start + timedelta(minutes=30 * i)),
                    end_time=ts(start + timedelta(minutes=30 * (i + 1))),
                )
                for i in range(3)
            ]
        ),
        metadata=api.md,
    )
    statuses = [s.status for s in reply.slots]
    assert statuses == [spb.SLOT_STATUS_HOLD, spb.SLOT_STATUS_HOLD, spb.SLOT_STATUS_AVAILABLE]
    got1, got2 = await entry(api, e1.id), await entry(api, e2.id)
    assert (await appointment(api, got1.appointment_id)).slot_id == reply.slots[0].id
    assert (await appointment(api, got2.appointment_id)).slot_id == reply.slots[1].id


async def test_a_declined_offer_goes_to_the_next_waiter_in_the_same_transaction(api: Api) -> None:
    spec = await api.specialist()
    start = hours_from_now(80)
    window = (start, start + timedelta(hours=1))
    first_api, first = await api.client()
    _, second = await api.client()
    e1 = await wait_for(api, first, *window, specialist_id=spec.id, priority=VIP)
    e2 = await wait_for(api, second, *window, specialist_id=spec.id)
    slot = await api.slot(spec.id, start)
    offer = (await entry(api, e1.id)).appointment_id

    # The waiter declines: cancelling the offered hold.
    declined = await first_api.appointments.CancelAppointment(
        apb.CancelAppointmentRequest(id=offer), metadata=first_api.md
    )
    assert declined.appointment.status == apb.APPOINTMENT_STATUS_CANCELLED
    assert (await entry(api, e1.id)).status == wpb.WAITLIST_ENTRY_STATUS_DECLINED
    nxt = await entry(api, e2.id)
    assert nxt.status == OFFERED
    assert (await appointment(api, nxt.appointment_id)).slot_id == slot.id
    # The cancel and the next offer are one transaction: adjacent in the log.
    events = (
        await api.appointments.ListAppointmentEvents(
            apb.ListAppointmentEventsRequest(page_size=1000), metadata=api.md
        )
    ).events
    cancel_at = next(
        i for i, e in enumerate(events) if e.type == apb.APPOINTMENT_EVENT_TYPE_CANCELLED
    )
    following = events[cancel_at + 1]
    assert following.waitlist_entry_id == e2.id
    assert following.cursor.split("-")[0] == events[cancel_at].cursor.split("-")[0]


async def test_a_lapsed_offer_goes_to_the_next_waiter_when_the_sweeper_releases_it(
    api: Api, database_url: str
) -> None:
    spec = await api.specialist()
    start = hours_from_now(90)
    window = (start, start + timedelta(hours=1))
    _, first = await api.client()
    _, second = await api.client()
    e1 = await wait_for(api, first, *window, specialist_id=spec.id, priority=URGENT)
    e2 = await wait_for(api, second, *window, specialist_id=spec.id)
    slot = await api.slot(spec.id, start)
    offer = (await entry(api, e1.id)).appointment_id
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE appointments SET expires_at = now() - interval '1 second' WHERE id = $1",
            uuid.UUID(offer),
        )
    finally:
        await conn.close()

    assert api.server.db is not None
    assert await appointment_store.expire_holds(api.server.db, 100) == 1

    assert (await entry(api, e1.id)).status == wpb.WAITLIST_ENTRY_STATUS_LAPSED
    nxt = await entry(api, e2.id)
    assert nxt.status == OFFERED
    assert (await appointment(api, nxt.appointment_id)).slot_id == slot.id


async def test_a_hold_reclaiming_a_lapsed_slot_a_waiter_is_entitled_to_finds_it_held(
    api: Api, database_url: str
) -> None:
    spec = await api.specialist()
    start = hours_from_now(100)
    slot = await api.slot(spec.id, start)
    _, holder = await api.client()
    lapsed = await api.hold(slot.id, user_id=holder)
    _, waiter = await api.client()
    wanted = await wait_for(api, waiter, start, start + timedelta(hours=1), specialist_id=spec.id)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE appointments SET expires_at = now() - interval '1 second' WHERE id = $1",
            uuid.UUID(lapsed.id),
        )
    finally:
        await conn.close()
    search = spb.SearchAvailableSlotsRequest(
        specialist_ids=[spec.id],
        window_start_time=ts(start - timedelta(hours=1)),
        window_end_time=ts(start + timedelta(hours=1)),
    )
    # Not free: the waiter would get it on reclaim.
    found = await api.slots.SearchAvailableSlots(search, metadata=api.md)
    assert list(found.available_slots) == []

    intruder, _ = await api.client()
    async with expect_failure(PRECONDITION, "SLOT_UNAVAILABLE") as failed:
        await intruder.hold(slot.id)
    assert failed[0].metadata["status"] == "HOLD"
    # The failed hold changed nothing; the sweeper then makes the offer.
    assert (await entry(api, wanted.id)).status == ACTIVE
    assert api.server.db is not None
    await appointment_store.expire_holds(api.server.db, 100)
    assert (await entry(api, wanted.id)).status == OFFERED


async def test_without_a_waiter_a_lapsed_hold_is_free_to_search_and_to_hold(
    api: Api, database_url: str
) -> None:
    spec = await api.specialist()
    start = hours_from_now(105)
    slot = await api.slot(spec.id, start)
    _, holder = await api.client()
    lapsed = await api.hold(slot.id, user_id=holder)
    search = spb.SearchAvailableSlotsRequest(
        specialist_ids=[spec.id],
        window_start_time=ts(start - timedelta(hours=1)),
        window_end_time=ts(start + timedelta(hours=1)),
    )
    assert (
        list((await api.slots.SearchAvailableSlots(search, metadata=api.md)).available_slots) == []
    )
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE appointments SET expires_at = now() - interval '1 second' WHERE id = $1",
            uuid.UUID(lapsed.id),
        )
    finally:
        await conn.close()
    found = await api.slots.SearchAvailableSlots(search, metadata=api.md)
    assert [a.slot.id for a in found.available_slots] == [slot.id]
    assert found.available_slots[0].slot.status == spb.SLOT_STATUS_AVAILABLE
    taker, taker_id = await api.client()
    assert (await taker.hold(slot.id)).user_id == taker_id


async def test_rescheduling_away_offers_the_old_slot(api: Api) -> None:
    spec = await api.specialist()
    start = hours_from_now(110)
    old = await api.slot(spec.id, start)
    new = await api.slot(spec.id, start + timedelta(hours=2))
    moving = await booked(api, old.id)
    _, waiter = await api.client()
    e = await wait_for(api, waiter, start, start + timedelta(hours=1), specialist_id=spec.id)
    await api.appointments.RescheduleAppointment(
        apb.RescheduleAppointmentRequest(id=moving.id, new_slot_id=new.id), metadata=api.md
    )
    got = await entry(api, e.id)
    assert got.status == OFFERED
    assert (await appointment(api, got.appointment_id)).slot_id == old.id


async def test_cancelling_an_entry(api: Api) -> None:
    spec = await api.specialist()
    start = hours_from_now(120)
    owner, owner_id = await api.client()
    stranger, _ = await api.client()
    waiting = await wait_for(
        api, owner_id, start, start + timedelta(hours=1), specialist_id=spec.id
    )

    async with expect_failure(grpc.StatusCode.NOT_FOUND, "WAITLIST_ENTRY_NOT_FOUND"):
        await stranger.waitlist.CancelWaitlistEntry(
            wpb.CancelWaitlistEntryRequest(id=waiting.id), metadata=stranger.md
        )
    reply = await owner.waitlist.CancelWaitlistEntry(
        wpb.CancelWaitlistEntryRequest(id=waiting.id), metadata=owner.md
    )
    assert reply.waitlist_entry.status == wpb.WAITLIST_ENTRY_STATUS_CANCELLED
    # A cancelled entry gets no offer.
    assert (await api.slot(spec.id, start)).status == spb.SLOT_STATUS_AVAILABLE
    async with expect_failure(PRECONDITION, "WAITLIST_ENTRY_WRONG_STATE"):
        await owner.waitlist.CancelWaitlistEntry(
            wpb.CancelWaitlistEntryRequest(id=waiting.id), metadata=owner.md
        )

    offered = await wait_for(
        api, owner_id, start + timedelta(hours=1), start + timedelta(hours=2), specialist_id=spec.id
    )
    await api.slot(spec.id, start + timedelta(hours=1))
    async with expect_failure(PRECONDITION, "WAITLIST_ENTRY_WRONG_STATE") as failed:
        await owner.waitlist.CancelWaitlistEntry(
            wpb.CancelWaitlistEntryRequest(id=offered.id), metadata=owner.md
        )
    assert failed[0].metadata["status"] == "OFFERED"


async def test_entries_whose_window_ended_expire(api: Api, database_url: str) -> None:
    spec = await api.specialist()
    _, user_id = await api.client()
    soon = await wait_for(api, user_id, hours_from_now(1), hours_from_now(2), specialist_id=spec.id)
    later = await wait_for(
        api, user_id, hours_from_now(1), hours_from_now(5), specialist_id=spec.id
    )
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE waitlist_entries SET window_start = now() - interval '2 hours',"
            " window_end = now() - interval '1 hour' WHERE id = $1",
            uuid.UUID(soon.id),
        )
    finally:
        await conn.close()
    assert api.server.db is not None
    assert await waitlist_store.expire(api.server.db, 100) == 1
    assert (await entry(api, soon.id)).status == wpb.WAITLIST_ENTRY_STATUS_EXPIRED
    assert (await entry(api, later.id)).status == ACTIVE


async def test_a_client_joins_for_itself_at_normal_priority_only(api: Api) -> None:
    spec = await api.specialist()
    client, client_id = await api.client()
    _, other_id = await api.client()
    window: dict[str, Any] = {
        "window_start_time": ts(hours_from_now(5)),
        "window_end_time": ts(hours_from_now(6)),
    }
    for kw in ({"user_id": other_id}, {"priority": VIP}, {"priority": URGENT}):
        async with expect_failure(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"):
            await client.waitlist.CreateWaitlistEntry(
                wpb.CreateWaitlistEntryRequest(specialist_id=spec.id, **window, **kw),
                metadata=client.md,
            )
    mine = await client.waitlist.CreateWaitlistEntry(
        wpb.CreateWaitlistEntryRequest(service_type="dentist", **window), metadata=client.md
    )
    assert mine.waitlist_entry.user_id == client_id
    assert mine.waitlist_entry.service_type == "dentist"
    staff = await wait_for(
        api, other_id, hours_from_now(5), hours_from_now(6), service_type="dentist", priority=URGENT
    )
    assert staff.priority == URGENT

    listed = await client.waitlist.ListWaitlistEntries(
        wpb.ListWaitlistEntriesRequest(), metadata=client.md
    )
    assert [e.id for e in listed.waitlist_entries] == [mine.waitlist_entry.id]
    async with expect_failure(grpc.StatusCode.NOT_FOUND, "WAITLIST_ENTRY_NOT_FOUND"):
        await client.waitlist.GetWaitlistEntry(
            wpb.GetWaitlistEntryRequest(id=staff.id), metadata=client.md
        )
    async with expect_failure(grpc.StatusCode.PERMISSION_DENIED):
        await client.waitlist.ListWaitlistEntries(
            wpb.ListWaitlistEntriesRequest(user_id=other_id), metadata=client.md
        )


async def test_bad_requests_are_invalid_argument_with_field_violations(api: Api) -> None:
    spec = await api.specialist()
    future = hours_from_now(5)
    cases: list[tuple[wpb.CreateWaitlistEntryRequest, set[str]]] = [
        (
            wpb.CreateWaitlistEntryRequest(
                window_start_time=ts(future), window_end_time=ts(future + timedelta(hours=1))
            ),
            {"specialist_id"},
        ),
        (
            wpb.CreateWaitlistEntryRequest(specialist_id="nope"),
            {"specialist_id", "window_start_time", "window_end_time"},
        ),
        (
            wpb.CreateWaitlistEntryRequest(
                service_type="dentist",
                window_start_time=ts(future),
                window_end_time=ts(future - timedelta(hours=1)),
                user_id="x",
                request_id="y",
                priority=99,  # type: ignore[arg-type]
            ),
            {"window_end_time", "user_id", "request_id", "priority"},
        ),
        (
            wpb.CreateWaitlistEntryRequest(
                service_type="dentist",
                window_start_time=ts(hours_from_now(-3)),
                window_end_time=ts(hours_from_now(-2)),
            ),
            {"window_end_time"},
        ),
        (
            wpb.CreateWaitlistEntryRequest(
                service_type="\x00",
                window_start_time=ts(future),
                window_end_time=ts(future + timedelta(days=400)),
            ),
            {"service_type", "window_end_time"},
        ),
    ]
    for request, fields in cases:
        async with expect_failure(INVALID, "INVALID_ARGUMENT") as failed:
            await api.waitlist.CreateWaitlistEntry(request, metadata=api.md)
        assert set(failed[0].violations) == fields, request
    for request_list in (
        wpb.ListWaitlistEntriesRequest(page_size=-1),
        wpb.ListWaitlistEntriesRequest(status=42),  # type: ignore[arg-type]
        wpb.ListWaitlistEntriesRequest(specialist_id="bad"),
        wpb.ListWaitlistEntriesRequest(page_token="garbage"),
    ):
        async with expect_failure(INVALID, "INVALID_ARGUMENT"):
            await api.waitlist.ListWaitlistEntries(request_list, metadata=api.md)
    async with expect_failure(INVALID, "INVALID_ARGUMENT"):
        await api.waitlist.GetWaitlistEntry(wpb.GetWaitlistEntryRequest(id="x"), metadata=api.md)
    # Valid but refused by the database: missing specialist, unknown user.
    async with expect_failure(grpc.StatusCode.NOT_FOUND, "SPECIALIST_NOT_FOUND"):
        await wait_for(
            api,
            await api.user_id(),
            future,
            future + timedelta(hours=1),
            specialist_id=str(uuid.uuid4()),
        )
    async with expect_failure(grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND"):
        await wait_for(
            api, str(uuid.uuid4()), future, future + timedelta(hours=1), specialist_id=spec.id
        )


async def test_a_request_id_returns_the_first_entry(api: Api) -> None:
    spec = await api.specialist()
    _, user_id = await api.client()
    start = hours_from_now(7)
    request_id = str(uuid.uuid4())
    first = await wait_for(
        api,
        user_id,
        start,
        start + timedelta(hours=1),
        specialist_id=spec.id,
        request_id=request_id,
    )
    again = await wait_for(
        api,
        user_id,
        start,
        start + timedelta(hours=1),
        specialist_id=spec.id,
        request_id=request_id,
    )
    assert again.id == first.id
    async with expect_failure(INVALID, "REQUEST_ID_REUSED"):
        await wait_for(
            api,
            user_id,
            start,
            start + timedelta(hours=2),
            specialist_id=spec.id,
            request_id=request_id,
        )
    listed = await api.waitlist.ListWaitlistEntries(
        wpb.ListWaitlistEntriesRequest(user_id=user_id), metadata=api.md
    )
    assert [e.id for e in listed.waitlist_entries] == [first.id]


async def test_list_filters_and_pages(api: Api) -> None:
    spec = await api.specialist()
    _, user_id = await api.client()
    start = hours_from_now(8)
    by_spec = [
        (await wait_for(api, user_id, start, start + timedelta(hours=1), specialist_id=spec.id)).id
        for _ in range(5)
    ]
    by_type = (
        await wait_for(api, user_id, start, start + timedelta(hours=1), service_type="x-ray")
    ).id
    await api.waitlist.CancelWaitlistEntry(
        wpb.CancelWaitlistEntryRequest(id=by_spec[0]), metadata=api.md
    )

    seen: list[str] = []
    token = ""
    while True:
        page = await api.waitlist.ListWaitlistEntries(
            wpb.ListWaitlistEntriesRequest(specialist_id=spec.id, page_size=2, page_token=token),
            metadata=api.md,
        )
        seen += [e.id for e in page.waitlist_entries]
        token = page.next_page_token
        if not token:
            break
    assert seen == by_spec
    active = await api.waitlist.ListWaitlistEntries(
        wpb.ListWaitlistEntriesRequest(user_id=user_id, status=ACTIVE), metadata=api.md
    )
    assert [e.id for e in active.waitlist_entries] == [*by_spec[1:], by_type]
    typed = await api.waitlist.ListWaitlistEntries(
        wpb.ListWaitlistEntriesRequest(service_type="x-ray"), metadata=api.md
    )
    assert [e.id for e in typed.waitlist_entries] == [by_type]
    first = await api.waitlist.ListWaitlistEntries(
        wpb.ListWaitlistEntriesRequest(specialist_id=spec.id, page_size=2), metadata=api.md
    )
    async with expect_failure(INVALID, "INVALID_ARGUMENT"):
        await api.waitlist.ListWaitlistEntries(
            wpb.ListWaitlistEntriesRequest(page_size=2, page_token=first.next_page_token),
            metadata=api.md,
        )


def test_the_offer_ttl_is_validated() -> None:
    assert Config().waitlist_offer_ttl == timedelta(minutes=15)
    for bad in (0.0, -1.0, 8 * 86400.0):
        try:
            Config(waitlist_offer_ttl_seconds=bad).validate()
        except ConfigError as exc:
            assert "waitlist_offer_ttl_seconds" in str(exc)
        else:
            raise AssertionError(f"{bad} accepted")
