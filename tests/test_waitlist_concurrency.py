"""The waitlist's guarantees under races, fought by real concurrent clients,
each on its own channel:

- an entry never holds two offers at once;
- a freed slot is offered to at most one entry;
- priority and first-come order hold when many slots free at once;
- a direct HoldSlot racing a release either came first or finds the slot
  held, and the waiter's own HoldSlot racing the offer deadlocks with
  nothing (offers never wait for a lock).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import grpc

from booking.v1 import appointment_pb2 as apb
from booking.v1 import appointment_pb2_grpc, waitlist_pb2_grpc
from booking.v1 import waitlist_pb2 as wpb
from service.server import BookingServer
from tests.population import fetch, insert_clients
from tests.support import Api, hours_from_now, running_server, ts

NORMAL = apb.APPOINTMENT_PRIORITY_NORMAL
VIP = apb.APPOINTMENT_PRIORITY_VIP
URGENT = apb.APPOINTMENT_PRIORITY_URGENT
OK = grpc.StatusCode.OK
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


async def _race(
    api: Api, calls: list[Callable[[grpc.aio.Channel], Awaitable[None]]], channels: int = 8
) -> list[grpc.StatusCode]:
    """Run the calls at once, spread over `channels` connections; the status
    code of each, in order."""
    target = f"127.0.0.1:{api.server.port}"
    opened = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    try:
        await asyncio.gather(*(ch.channel_ready() for ch in opened))
        start = asyncio.Event()

        async def one(i: int) -> grpc.StatusCode:
            await start.wait()
            try:
                await calls[i](opened[i % channels])
                return OK
            except grpc.aio.AioRpcError as err:
                return err.code()

        tasks = [asyncio.create_task(one(i)) for i in range(len(calls))]
        await asyncio.sleep(0.05)
        start.set()
        return list(await asyncio.gather(*tasks))
    finally:
        await asyncio.gather(*(ch.close(None) for ch in opened))


def _stub(channel: grpc.aio.Channel) -> appointment_pb2_grpc.AppointmentServiceAsyncStub:
    return appointment_pb2_grpc.AppointmentServiceStub(channel)


async def _booked(api: Api, slot_id: str, owner: str) -> str:
    held = await api.hold(slot_id, user_id=owner)
    await api.appointments.ConfirmAppointment(
        apb.ConfirmAppointmentRequest(id=held.id), metadata=api.md
    )
    return held.id


async def _wait(
    api: Api,
    user_id: str,
    start: datetime,
    end: datetime,
    priority: apb.AppointmentPriority.ValueType = NORMAL,
    **target: Any,
) -> str:
    reply = await api.waitlist.CreateWaitlistEntry(
        wpb.CreateWaitlistEntryRequest(
            user_id=user_id,
            window_start_time=ts(start),
            window_end_time=ts(end),
            priority=priority,
            **target,
        ),
        metadata=api.md,
    )
    return reply.waitlist_entry.id


def _cancel(
    appointment_id: str, md: list[tuple[str, str]]
) -> Callable[[grpc.aio.Channel], Awaitable[None]]:
    async def call(channel: grpc.aio.Channel) -> None:
        await _stub(channel).CancelAppointment(
            apb.CancelAppointmentRequest(id=appointment_id), metadata=md
        )

    return call


def _hold(
    slot_id: str, user_id: str, md: list[tuple[str, str]]
) -> Callable[[grpc.aio.Channel], Awaitable[None]]:
    async def call(channel: grpc.aio.Channel) -> None:
        await _stub(channel).HoldSlot(
            apb.HoldSlotRequest(slot_id=slot_id, user_id=user_id), metadata=md
        )

    return call


async def _offers(database_url: str) -> list[asyncpg.Record]:
    return await fetch(
        database_url,
        "SELECT w.id AS waitlist_entry_id, e.time_slot_id, e.appointment_id"
        " FROM appointment_events e JOIN waitlist_entries w ON w.appointment_id = e.appointment_id"
        " WHERE e.event_type = 'HELD' ORDER BY e.xid, e.seq",
    )


@asynccontextmanager
async def _counting_conflicts(server: BookingServer) -> AsyncIterator[Counter[str]]:
    """Every retried conflict (serialization failure, deadlock) in the block."""
    assert server.db is not None
    seen: Counter[str] = Counter()
    previous = server.db.on_retry

    def note(name: str) -> None:
        seen[name] += 1
        if previous is not None:
            previous(name)

    server.db.on_retry = note
    try:
        yield seen
    finally:
        server.db.on_retry = previous


async def test_an_entry_never_holds_two_offers_at_once(api: Api, database_url: str) -> None:
    base = hours_from_now(30)
    specialists = [await api.specialist(f"Dr. {i}", "dentist") for i in range(8)]
    owners = await insert_clients(database_url, 8)
    (waiter,) = await insert_clients(database_url, 1)
    for round_ in range(3):
        start = base + timedelta(days=round_)
        # Eight slots at eight different hours, so only the entry lock (not
        # the user's overlap rule) keeps the waiter to one offer.
        bookings = []
        for i, spec in enumerate(specialists):
            slot = await api.slot(spec.id, start + timedelta(hours=i))
            bookings.append(await _booked(api, slot.id, owners[i]))
        entry_id = await _wait(
            api, waiter, start, start + timedelta(hours=9), service_type="dentist"
        )

        codes = await _race(api, [_cancel(b, api.md) for b in bookings])

        assert codes == [OK] * 8
        offered = [
            o for o in await _offers(database_url) if str(o["waitlist_entry_id"]) == entry_id
        ]
        assert len(offered) == 1
        held = await fetch(
            database_url,
            "SELECT count(*) AS n FROM time_slots s JOIN appointments a ON a.time_slot_id = s.id"
            " WHERE a.user_id = $1 AND a.status = 'HOLD'",
            uuid.UUID(waiter),
        )
        assert held[0]["n"] == 1
        # Free it for the next round: the waiter declines.
        await api.appointments.CancelAppointment(
            apb.CancelAppointmentRequest(id=str(offered[0]["appointment_id"])), metadata=api.md
        )


async def test_a_freed_slot_is_offered_to_at_most_one_entry(api: Api, database_url: str) -> None:
    spec = await api.specialist()
    base = hours_from_now(30)
    waiters = await insert_clients(database_url, 10)
    intruders = await insert_clients(database_url, 8)
    (owner,) = await insert_clients(database_url, 1)
    for round_ in range(3):
        start = base + timedelta(days=round_)
        slot = await api.slot(spec.id, start)
        booking = await _booked(api, slot.id, owner)
        for w in waiters:
            await _wait(api, w, start, start + timedelta(hours=1), specialist_id=spec.id)
        # Eight copies of the cancel and eight direct holds, all at once.
        calls = [_cancel(booking, api.md) for _ in range(8)]
        calls += [_hold(slot.id, u, api.md) for u in intruders]

        codes = await _race(api, calls)

        assert Counter(codes[:8]) == {OK: 1, PRECONDITION: 7}
        assert codes[8:] == [PRECONDITION] * 8
        for_slot = [o for o in await _offers(database_url) if str(o["time_slot_id"]) == slot.id]
        assert len(for_slot) == 1
        offered = await fetch(
            database_url,
            "SELECT count(*) AS n FROM waitlist_entries w JOIN appointments a"
            " ON a.id = w.appointment_id WHERE a.time_slot_id = $1",
            uuid.UUID(slot.id),
        )
        assert offered[0]["n"] == 1
        live = await fetch(
            database_url,
            "SELECT user_id FROM appointments WHERE time_slot_id = $1 AND status <> 'CANCELLED'",
            uuid.UUID(slot.id),
        )
        assert [str(r["user_id"]) for r in live] == [waiters[0]]
        # The next round's first waiter is the next one in line.
        waiters = waiters[1:] + waiters[:1]
        await fetch(
            database_url,
            "UPDATE waitlist_entries SET status = 'CANCELLED' WHERE status = 'ACTIVE'",
        )


async def test_priority_and_first_come_order_hold_when_many_slots_free_at_once(
    api: Api, database_url: str
) -> None:
    spec = await api.specialist()
    rng = random.Random(10)
    base = hours_from_now(30)
    owners = await insert_clients(database_url, 6)
    for round_ in range(3):
        start = base + timedelta(days=round_)
        slots = [await api.slot(spec.id, start + timedelta(hours=i)) for i in range(6)]
        bookings = [await _booked(api, s.id, owners[i]) for i, s in enumerate(slots)]
        waiters = await insert_clients(database_url, 14)
        ranked: list[tuple[int, int, str]] = []
        for n, w in enumerate(waiters):
            priority = rng.choice([NORMAL, VIP, URGENT])
            entry = await _wait(
                api, w, start, start + timedelta(hours=7), priority, specialist_id=spec.id
            )
            ranked.append((-priority, n, entry))
        expected = {entry for _, _, entry in sorted(ranked)[:6]}

        codes = await _race(api, [_cancel(b, api.md) for b in bookings])

        assert codes == [OK] * 6
        rows = await fetch(
            database_url,
            "SELECT id FROM waitlist_entries WHERE status = 'OFFERED' AND user_id = ANY($1::uuid[])",
            [uuid.UUID(w) for w in waiters],
        )
        assert {str(r["id"]) for r in rows} == expected


async def test_a_direct_hold_racing_the_release_finds_the_slot_held(database_url: str) -> None:
    """Holds lapse and the sweeper releases them (every 20 ms) while clients
    keep trying to take the slot directly: the waiter always gets it."""
    async with (
        running_server(database_url, sweep_interval_seconds=0.02, hold_ttl_seconds=0.3) as server,
        Api.connect(server) as api,
    ):
        spec = await api.specialist()
        base = hours_from_now(30)
        intruders = await insert_clients(database_url, 6)
        (holder,) = await insert_clients(database_url, 1)
        for round_ in range(3):
            start = base + timedelta(days=round_)
            slot = await api.slot(spec.id, start)
            await api.hold(slot.id, user_id=holder)
            (waiter,) = await insert_clients(database_url, 1)
            entry_id = await _wait(
                api, waiter, start, start + timedelta(hours=1), specialist_id=spec.id
            )
            codes: list[grpc.StatusCode] = []
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                codes += await _race(
                    api, [_hold(slot.id, u, api.md) for u in intruders], channels=6
                )
                status = await fetch(
                    database_url,
                    "SELECT status FROM waitlist_entries WHERE id = $1",
                    uuid.UUID(entry_id),
                )
                if status[0]["status"] == "OFFERED":
                    break
                assert asyncio.get_running_loop().time() < deadline, "no offer was made"
            assert set(codes) == {PRECONDITION}
            live = await fetch(
                database_url,
                "SELECT user_id FROM appointments WHERE time_slot_id = $1 AND status <> 'CANCELLED'",
                uuid.UUID(slot.id),
            )
            assert [str(r["user_id"]) for r in live] == [waiter]


async def test_the_waiters_own_hold_racing_the_offer_deadlocks_with_nothing(
    api: Api, database_url: str
) -> None:
    """HoldSlot locks the user, then the slot; the release holds the slot and
    offers to that same user. The offer takes the user with SKIP LOCKED, so
    there is no lock cycle: the waiter ends up with the slot either way."""
    spec = await api.specialist()
    base = hours_from_now(30)
    (owner,) = await insert_clients(database_url, 1)
    async with _counting_conflicts(api.server) as conflicts:
        for round_ in range(8):
            start = base + timedelta(hours=2 * round_)
            slot = await api.slot(spec.id, start)
            booking = await _booked(api, slot.id, owner)
            (waiter,) = await insert_clients(database_url, 1)
            await _wait(api, waiter, start, start + timedelta(hours=1), specialist_id=spec.id)
            calls = [_cancel(booking, api.md)] + [_hold(slot.id, waiter, api.md)] * 4
            codes = await _race(api, calls, channels=5)
            assert codes[0] == OK
            live = await fetch(
                database_url,
                "SELECT user_id FROM appointments WHERE time_slot_id = $1 AND status <> 'CANCELLED'",
                uuid.UUID(slot.id),
            )
            assert [str(r["user_id"]) for r in live] == [waiter]
    assert conflicts["DeadlockDetectedError"] == 0, conflicts


async def test_copies_of_one_create_racing_make_one_entry(api: Api, database_url: str) -> None:
    """Copies of a CreateWaitlistEntry with one request id, held at their
    insert until all have checked for the key: the losers then conflict on
    the key, retry and return the winner's entry."""
    spec = await api.specialist()
    (user,) = await insert_clients(database_url, 1)
    start = hours_from_now(30)
    request = wpb.CreateWaitlistEntryRequest(
        user_id=user,
        specialist_id=spec.id,
        window_start_time=ts(start),
        window_end_time=ts(start + timedelta(hours=1)),
        request_id=str(uuid.uuid4()),
    )
    gate = await asyncpg.connect(database_url)
    try:
        await gate.execute("BEGIN")
        await gate.execute("LOCK TABLE waitlist_entries IN SHARE MODE")
        stub = waitlist_pb2_grpc.WaitlistServiceStub(api.channel)
        copies = [
            asyncio.ensure_future(stub.CreateWaitlistEntry(request, metadata=api.md))
            for _ in range(4)
        ]
        # Every copy has looked for the key and waits to insert.
        while True:
            waiting = await gate.fetchval(
                "SELECT count(*) FROM pg_locks WHERE relation = 'waitlist_entries'::regclass"
                " AND NOT granted"
            )
            if waiting == len(copies):
                break
            await asyncio.sleep(0.02)
        await gate.execute("COMMIT")
        replies = await asyncio.gather(*copies)
    finally:
        await gate.close()

    assert len({r.waitlist_entry.id for r in replies}) == 1
    rows = await fetch(
        database_url,
        "SELECT count(*) AS n FROM waitlist_entries WHERE user_id = $1",
        uuid.UUID(user),
    )
    assert rows[0]["n"] == 1
