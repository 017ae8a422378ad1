"""Seats: a slot of capacity N takes at most N seats of live appointments,
under any concurrency (docs/seats.md)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import timedelta

import grpc

from booking.v1 import appointment_pb2 as apb
from booking.v1 import appointment_pb2_grpc, slot_pb2_grpc
from booking.v1 import slot_pb2 as spb
from booking.v1 import waitlist_pb2 as wpb
from storage.models import Role
from tests.population import fetch, insert_clients
from tests.support import Api, expect_failure, failure, hours_from_now, ts
from tests.test_concurrency import _race
from tests.test_waitlist import entry, wait_for

PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


async def _seat_slot(api: Api, capacity: int, hours: float = 30) -> spb.Slot:
    spec = await api.specialist()
    start = hours_from_now(hours)
    reply = await api.slots.CreateSlot(
        spb.CreateSlotRequest(
            specialist_id=spec.id,
            start_time=ts(start),
            end_time=ts(start + timedelta(minutes=60)),
            capacity=capacity,
        ),
        metadata=api.md,
    )
    return reply.slot


async def _get(api: Api, slot_id: str) -> spb.Slot:
    return (await api.slots.GetSlot(spb.GetSlotRequest(id=slot_id), metadata=api.md)).slot


async def _counts(database_url: str, slot_id: str) -> tuple[int, int, int, str]:
    """(live appointments' seats, seats_taken, capacity, status) from the tables."""
    rows = await fetch(
        database_url,
        "SELECT (SELECT coalesce(sum(party_size), 0)::int FROM appointments"
        "        WHERE time_slot_id = s.id AND status <> 'CANCELLED') AS live,"
        " s.seats_taken, s.capacity, s.status::text AS status"
        " FROM time_slots s WHERE s.id = $1",
        uuid.UUID(slot_id),
    )
    r = rows[0]
    return r["live"], r["seats_taken"], r["capacity"], r["status"]


async def test_64_clients_racing_for_a_5_seat_slot_exactly_5_win(
    api: Api, database_url: str
) -> None:
    operator = api.as_(await api.make_token(Role.OPERATOR))
    slot = await _seat_slot(api, 5)
    users = await insert_clients(database_url, 64)
    refusals: list[str] = []

    async def hold(channel: grpc.aio.Channel, i: int) -> None:
        stub = appointment_pb2_grpc.AppointmentServiceStub(channel)
        try:
            await stub.HoldSlot(
                apb.HoldSlotRequest(slot_id=slot.id, user_id=users[i]), metadata=operator.md
            )
        except grpc.aio.AioRpcError as err:
            refusals.append(failure(err).reason)
            raise

    codes = Counter(await _race(api, 64, hold))

    assert codes == {grpc.StatusCode.OK: 5, PRECONDITION: 59}
    assert set(refusals) == {"SLOT_UNAVAILABLE"}
    assert await _counts(database_url, slot.id) == (5, 5, 5, "HOLD")
    events = await fetch(database_url, "SELECT event_type FROM appointment_events")
    assert [e["event_type"] for e in events] == ["HELD"] * 5
    got = await _get(api, slot.id)
    assert (got.capacity, got.seats_available, got.status) == (5, 0, spb.SLOT_STATUS_HOLD)


async def test_status_follows_the_seats_and_a_party_takes_all_its_seats_or_none(
    api: Api, database_url: str
) -> None:
    slot = await _seat_slot(api, 4)
    assert (slot.capacity, slot.seats_available, slot.status) == (4, 4, spb.SLOT_STATUS_AVAILABLE)
    a, _ = await api.client()
    b, _ = await api.client()
    c, _ = await api.client()

    first = await a.hold(slot.id, party_size=3)
    assert first.party_size == 3
    got = await _get(api, slot.id)
    assert (got.seats_available, got.status) == (1, spb.SLOT_STATUS_AVAILABLE)

    # Two seats asked, one free: refused, nothing taken.
    async with expect_failure(PRECONDITION, "NOT_ENOUGH_SEATS") as box:
        await b.hold(slot.id, party_size=2)
    assert box[0].metadata == {"slot_id": slot.id, "seats_available": "1", "party_size": "2"}
    assert await _counts(database_url, slot.id) == (3, 3, 4, "AVAILABLE")

    second = await b.hold(slot.id)
    assert second.party_size == 1
    assert (await _get(api, slot.id)).status == spb.SLOT_STATUS_HOLD
    async with expect_failure(PRECONDITION, "SLOT_UNAVAILABLE") as box:
        await c.hold(slot.id)
    assert box[0].metadata == {"slot_id": slot.id, "status": "HOLD"}

    for who, appt in ((a, first), (b, second)):
        confirmed = await who.appointments.ConfirmAppointment(
            apb.ConfirmAppointmentRequest(id=appt.id), metadata=who.md
        )
        assert confirmed.appointment.party_size == appt.party_size
    assert (await _get(api, slot.id)).status == spb.SLOT_STATUS_BOOKED
    await b.appointments.CancelAppointment(
        apb.CancelAppointmentRequest(id=second.id), metadata=b.md
    )
    got = await _get(api, slot.id)
    assert (got.seats_available, got.status) == (1, spb.SLOT_STATUS_AVAILABLE)
    assert await _counts(database_url, slot.id) == (3, 3, 4, "AVAILABLE")
    listed = await api.appointments.GetAppointment(
        apb.GetAppointmentRequest(id=first.id), metadata=api.md
    )
    assert listed.appointment.party_size == 3
    # Events carry the party size too (read from the appointment).
    events = await api.appointments.ListAppointmentEvents(
        apb.ListAppointmentEventsRequest(
            filter=apb.AppointmentEventFilter(appointment_id=first.id)
        ),
        metadata=api.md,
    )
    assert [e.appointment.party_size for e in events.events] == [3, 3]


async def test_a_slot_of_one_seat_reads_as_before_seats(api: Api) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(30))
    assert (slot.capacity, slot.seats_available) == (1, 1)
    client, _ = await api.client()
    held = await client.hold(slot.id)
    assert held.party_size == 1
    got = await _get(api, slot.id)
    assert (got.status, got.seats_available) == (spb.SLOT_STATUS_HOLD, 0)
    async with expect_failure(PRECONDITION, "SLOT_UNAVAILABLE") as box:
        await (await api.client())[0].hold(slot.id)
    assert box[0].metadata == {"slot_id": slot.id, "status": "HOLD"}


async def test_capacity_is_raised_or_lowered_only_down_to_the_seats_taken(
    api: Api, database_url: str
) -> None:
    slot = await _seat_slot(api, 5)
    for _ in range(3):
        await (await api.client())[0].hold(slot.id)

    async with expect_failure(PRECONDITION, "CAPACITY_BELOW_SEATS_TAKEN") as box:
        await api.slots.UpdateSlotCapacity(
            spb.UpdateSlotCapacityRequest(id=slot.id, capacity=2), metadata=api.md
        )
    assert box[0].metadata == {"slot_id": slot.id, "capacity": "2", "seats_taken": "3"}
    assert await _counts(database_url, slot.id) == (3, 3, 5, "AVAILABLE")

    lowered = await api.slots.UpdateSlotCapacity(
        spb.UpdateSlotCapacityRequest(id=slot.id, capacity=3), metadata=api.md
    )
    assert (lowered.slot.capacity, lowered.slot.seats_available) == (3, 0)
    assert lowered.slot.status == spb.SLOT_STATUS_HOLD
    raised = await api.slots.UpdateSlotCapacity(
        spb.UpdateSlotCapacityRequest(id=slot.id, capacity=4), metadata=api.md
    )
    assert (raised.slot.seats_available, raised.slot.status) == (1, spb.SLOT_STATUS_AVAILABLE)
    async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT):
        await api.slots.UpdateSlotCapacity(
            spb.UpdateSlotCapacityRequest(id=slot.id, capacity=0), metadata=api.md
        )


async def test_lowering_capacity_while_holds_race_never_overbooks(
    api: Api, database_url: str
) -> None:
    operator = api.as_(await api.make_token(Role.OPERATOR))
    slot = await _seat_slot(api, 8)
    users = await insert_clients(database_url, 32)
    lowered: list[bool] = []

    async def call(channel: grpc.aio.Channel, i: int) -> None:
        if i % 8 == 0:
            stub = slot_pb2_grpc.SlotServiceStub(channel)
            try:
                await stub.UpdateSlotCapacity(
                    spb.UpdateSlotCapacityRequest(id=slot.id, capacity=3), metadata=operator.md
                )
                lowered.append(True)
            except grpc.aio.AioRpcError as err:
                assert failure(err).reason == "CAPACITY_BELOW_SEATS_TAKEN"
                raise
            return
        await appointment_pb2_grpc.AppointmentServiceStub(channel).HoldSlot(
            apb.HoldSlotRequest(slot_id=slot.id, user_id=users[i]), metadata=operator.md
        )

    codes = Counter(await _race(api, 32, call))

    assert set(codes) <= {grpc.StatusCode.OK, PRECONDITION}
    live, taken, capacity, _ = await _counts(database_url, slot.id)
    assert live == taken <= capacity
    assert capacity == (3 if lowered else 8)
    assert codes[grpc.StatusCode.OK] == live + len(lowered)


async def test_freed_seats_go_to_the_waitlist_in_priority_order_one_each(
    api: Api, database_url: str
) -> None:
    slot = await _seat_slot(api, 3)
    holders = [await api.client() for _ in range(3)]
    held = [await who.hold(slot.id) for who, _ in holders]
    assert (await _get(api, slot.id)).status == spb.SLOT_STATUS_HOLD

    window = (hours_from_now(1), hours_from_now(100))
    waiters = [(await api.client())[1] for _ in range(3)]
    normal = await wait_for(api, waiters[0], *window, specialist_id=slot.specialist_id)
    urgent = await wait_for(
        api,
        waiters[1],
        *window,
        specialist_id=slot.specialist_id,
        priority=apb.APPOINTMENT_PRIORITY_URGENT,
    )
    late = await wait_for(api, waiters[2], *window, specialist_id=slot.specialist_id)

    # One seat freed: the URGENT entry gets it, the others wait.
    who, _ = holders[0]
    await who.appointments.CancelAppointment(
        apb.CancelAppointmentRequest(id=held[0].id), metadata=who.md
    )
    assert (await entry(api, urgent.id)).status == wpb.WAITLIST_ENTRY_STATUS_OFFERED
    assert (await entry(api, normal.id)).status == wpb.WAITLIST_ENTRY_STATUS_ACTIVE
    # Two more seats (a raise of capacity counts as freed seats): one each,
    # first come within NORMAL.
    await api.slots.UpdateSlotCapacity(
        spb.UpdateSlotCapacityRequest(id=slot.id, capacity=5), metadata=api.md
    )
    assert (await entry(api, normal.id)).status == wpb.WAITLIST_ENTRY_STATUS_OFFERED
    assert (await entry(api, late.id)).status == wpb.WAITLIST_ENTRY_STATUS_OFFERED
    offered = await fetch(
        database_url,
        "SELECT a.user_id::text AS user_id, a.party_size FROM waitlist_entries w"
        " JOIN appointments a ON a.id = w.appointment_id WHERE w.status = 'OFFERED'",
    )
    assert sorted((r["user_id"], r["party_size"]) for r in offered) == sorted(
        (w, 1) for w in waiters
    )
    # 2 holders left + 3 offers = 5 seats: full.
    assert await _counts(database_url, slot.id) == (5, 5, 5, "HOLD")


async def test_search_shows_a_slot_while_a_seat_is_free(api: Api) -> None:
    slot = await _seat_slot(api, 2)
    window = spb.SearchAvailableSlotsRequest(
        specialist_ids=[slot.specialist_id],
        window_start_time=ts(hours_from_now(1)),
        window_end_time=ts(hours_from_now(100)),
    )

    async def found() -> list[tuple[str, int]]:
        reply = await api.slots.SearchAvailableSlots(window, metadata=api.md)
        return [(a.slot.id, a.slot.seats_available) for a in reply.available_slots]

    await (await api.client())[0].hold(slot.id)
    assert await found() == [(slot.id, 1)]
    await (await api.client())[0].hold(slot.id)
    assert await found() == []


async def test_a_herd_on_a_seat_slot_in_one_process_is_not_refused_while_a_seat_is_free(
    api: Api, database_url: str
) -> None:
    """Hold coalescing (storage/flights.py) answers waiting callers from a
    refusal only: 20 callers of one process on a 20-seat slot all win."""
    operator = api.as_(await api.make_token(Role.OPERATOR))
    slot = await _seat_slot(api, 20)
    users = await insert_clients(database_url, 20)

    async def hold(i: int) -> None:
        await operator.appointments.HoldSlot(
            apb.HoldSlotRequest(slot_id=slot.id, user_id=users[i]), metadata=operator.md
        )

    await asyncio.gather(*(hold(i) for i in range(20)))
    assert await _counts(database_url, slot.id) == (20, 20, 20, "HOLD")


async def test_a_waitlist_party_is_offered_all_its_seats_or_none(
    api: Api, database_url: str
) -> None:
    """An entry asking for 3 seats is passed over while fewer are free (the
    single behind it is served), and offered all 3 once they are."""
    slot = await _seat_slot(api, 4)
    holders = [await api.client() for _ in range(4)]
    held = [await who.hold(slot.id) for who, _ in holders]
    window = (hours_from_now(1), hours_from_now(100))
    party_user, single_user = (await api.client())[1], (await api.client())[1]
    party = await wait_for(
        api,
        party_user,
        *window,
        specialist_id=slot.specialist_id,
        priority=apb.APPOINTMENT_PRIORITY_URGENT,
        party_size=3,
    )
    assert party.party_size == 3
    single = await wait_for(api, single_user, *window, specialist_id=slot.specialist_id)
    assert single.party_size == 1

    async def free(k: int) -> None:
        who, _ = holders[k]
        await who.appointments.CancelAppointment(
            apb.CancelAppointmentRequest(id=held[k].id), metadata=who.md
        )

    await free(0)  # one free: the party does not fit, the single does
    assert (await entry(api, party.id)).status == wpb.WAITLIST_ENTRY_STATUS_ACTIVE
    assert (await entry(api, single.id)).status == wpb.WAITLIST_ENTRY_STATUS_OFFERED
    await free(1)
    await free(2)  # two free
    assert (await entry(api, party.id)).status == wpb.WAITLIST_ENTRY_STATUS_ACTIVE
    assert await _counts(database_url, slot.id) == (2, 2, 4, "AVAILABLE")
    await free(3)  # three free: all three to the party
    offered = await entry(api, party.id)
    assert offered.status == wpb.WAITLIST_ENTRY_STATUS_OFFERED
    appointment = await api.appointments.GetAppointment(
        apb.GetAppointmentRequest(id=offered.appointment_id), metadata=api.md
    )
    assert appointment.appointment.party_size == 3
    assert await _counts(database_url, slot.id) == (4, 4, 4, "HOLD")
    async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT):
        await wait_for(api, party_user, *window, specialist_id=slot.specialist_id, party_size=-1)


async def test_freed_seats_race_waitlist_parties_and_holds_never_over_capacity(
    api: Api, database_url: str
) -> None:
    """Five holders cancel at once while 24 clients race HoldSlot for two
    seats each, and parties of 2 and 3 wait: every offer holds all its
    entry's seats, and the slot never takes more than its 5."""
    slot = await _seat_slot(api, 5)
    holders = [await api.client() for _ in range(5)]
    held = [await who.hold(slot.id) for who, _ in holders]
    window = (hours_from_now(1), hours_from_now(100))
    for size in (3, 2, 3, 2, 1):
        await wait_for(
            api, (await api.client())[1], *window, specialist_id=slot.specialist_id, party_size=size
        )
    racers = [await api.client() for _ in range(24)]

    async def call(channel: grpc.aio.Channel, i: int) -> None:
        if i < 5:
            who, _ = holders[i]
            await appointment_pb2_grpc.AppointmentServiceStub(channel).CancelAppointment(
                apb.CancelAppointmentRequest(id=held[i].id), metadata=who.md
            )
        else:
            who, _ = racers[i - 5]
            await appointment_pb2_grpc.AppointmentServiceStub(channel).HoldSlot(
                apb.HoldSlotRequest(slot_id=slot.id, party_size=2), metadata=who.md
            )

    codes = await _race(api, 29, call)
    assert set(codes[:5]) == {grpc.StatusCode.OK}
    assert set(codes[5:]) <= {grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION}
    live, taken, capacity, _ = await _counts(database_url, slot.id)
    assert live == taken <= capacity == 5
    offers = await fetch(
        database_url,
        "SELECT w.party_size AS asked, a.party_size AS got FROM waitlist_entries w"
        " JOIN appointments a ON a.id = w.appointment_id WHERE w.status = 'OFFERED'",
    )
    assert all(r["asked"] == r["got"] for r in offers)
    won = codes[5:].count(grpc.StatusCode.OK)
    assert 2 * won + sum(r["got"] for r in offers) == live
    # Nothing left on the table: the seats still free fit no waiting entry.
    waiting = await fetch(
        database_url,
        "SELECT min(party_size) AS smallest FROM waitlist_entries WHERE status = 'ACTIVE'",
    )
    if waiting[0]["smallest"] is not None:
        assert capacity - taken < waiting[0]["smallest"]


async def test_search_for_a_party_shows_slots_with_that_many_seats(
    api: Api, database_url: str
) -> None:
    """A slot is free to a party of N when N of its seats are, or will be
    once its lapsed holds are reclaimed, as HoldSlot would make room."""
    spec = await api.specialist()
    slots = []
    for k in range(3):
        start = hours_from_now(30 + k)
        reply = await api.slots.CreateSlot(
            spb.CreateSlotRequest(
                specialist_id=spec.id,
                start_time=ts(start),
                end_time=ts(start + timedelta(minutes=30)),
                capacity=3,
            ),
            metadata=api.md,
        )
        slots.append(reply.slot.id)
    await (await api.client())[0].hold(slots[0], party_size=2)  # 1 left
    lapsed = await (await api.client())[0].hold(slots[1], party_size=2)  # 1 left, lapsing
    await fetch(
        database_url,
        "UPDATE appointments SET expires_at = now() - interval '1 minute' WHERE id = $1",
        uuid.UUID(lapsed.id),
    )
    client, _ = await api.client()

    async def found(party: int) -> list[tuple[str, int]]:
        reply = await client.slots.SearchAvailableSlots(
            spb.SearchAvailableSlotsRequest(
                specialist_ids=[spec.id],
                window_start_time=ts(hours_from_now(1)),
                window_end_time=ts(hours_from_now(100)),
                party_size=party,
            ),
            metadata=client.md,
        )
        return [(a.slot.id, a.slot.seats_available) for a in reply.available_slots]

    assert await found(0) == [(slots[0], 1), (slots[1], 1), (slots[2], 3)]
    assert await found(2) == [(slots[1], 2), (slots[2], 3)]
    assert await found(3) == [(slots[1], 3), (slots[2], 3)]
    assert await found(4) == []
    # What the search showed, a party can hold: the lapsed hold makes room.
    held = await client.hold(slots[1], party_size=3)
    assert held.party_size == 3
    async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT):
        await found(-1)
