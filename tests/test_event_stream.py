"""WatchAppointmentEvents and ListAppointmentEvents: order, gaps, resume,
filters, heartbeats, limits, replicas."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg
import grpc

from booking.v1 import appointment_pb2 as apb
from service.server import BookingServer
from storage.functions import HOLD_SLOT
from storage.models import Role
from tests.population import fetch, insert_clients
from tests.support import Api, ServerConfig, expect_failure, hours_from_now, running_server

BEGINNING = apb.WatchAppointmentEventsRequest(start_position=apb.WATCH_START_POSITION_BEGINNING)


class Watch:
    """One open WatchAppointmentEvents call.

    A reader task pumps messages into a queue: timing out on call.read()
    itself would cancel the whole RPC."""

    def __init__(self, api: Api, request: apb.WatchAppointmentEventsRequest) -> None:
        self.call = api.appointments.WatchAppointmentEvents(request, metadata=api.md)
        self.last_cursor = ""
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for message in self.call:
                await self._queue.put(message)
            await self._queue.put(None)
        except grpc.aio.AioRpcError as err:
            await self._queue.put(err)

    async def next(self, wait: float = 5.0) -> apb.WatchAppointmentEventsResponse:
        message = await asyncio.wait_for(self._queue.get(), wait)
        if isinstance(message, grpc.aio.AioRpcError):
            raise message
        assert message is not None, "stream ended"
        kind = message.WhichOneof("kind")
        self.last_cursor = message.event.cursor if kind == "event" else message.heartbeat.cursor
        return message

    async def events(self, count: int, wait: float = 10.0) -> list[apb.AppointmentEvent]:
        out: list[apb.AppointmentEvent] = []
        deadline = asyncio.get_running_loop().time() + wait
        while len(out) < count:
            remaining = deadline - asyncio.get_running_loop().time()
            assert remaining > 0, f"got {len(out)} of {count} events"
            message = await self.next(remaining)
            if message.WhichOneof("kind") == "event":
                out.append(message.event)
        return out

    async def quiet_for(self, seconds: float) -> None:
        """Asserts that only heartbeats arrive for `seconds`."""
        deadline = asyncio.get_running_loop().time() + seconds
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                message = await self.next(remaining)
            except TimeoutError:
                return
            assert message.WhichOneof("kind") == "heartbeat", message

    def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()


@asynccontextmanager
async def watching(api: Api, request: apb.WatchAppointmentEventsRequest) -> AsyncIterator[Watch]:
    watch = Watch(api, request)
    try:
        yield watch
    finally:
        watch.close()


async def _booking(api: Api, hours: float) -> apb.Appointment:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(hours))
    return await api.hold(slot.id)


async def test_watch_from_the_beginning_delivers_history_then_live_events(api: Api) -> None:
    first = await _booking(api, 10)
    async with watching(api, BEGINNING) as watch:
        (old,) = await watch.events(1)
        second = await _booking(api, 11)
        (new,) = await watch.events(1)
    assert old.appointment.id == first.id and old.type == apb.APPOINTMENT_EVENT_TYPE_HELD
    assert new.appointment.id == second.id
    assert new.appointment.status == apb.APPOINTMENT_STATUS_HOLD
    assert new.cursor > "" and new.create_time.seconds > 0 and new.id


async def test_watch_from_now_skips_history(api: Api) -> None:
    await _booking(api, 10)
    async with watching(api, apb.WatchAppointmentEventsRequest()) as watch:
        hello = await watch.next()
        assert hello.WhichOneof("kind") == "heartbeat"
        later = await _booking(api, 12)
        (event,) = await watch.events(1)
    assert event.appointment.id == later.id


async def test_resuming_after_a_cursor_continues_exclusively(api: Api) -> None:
    booked = [await _booking(api, 10 + i) for i in range(3)]
    async with watching(api, BEGINNING) as watch:
        first, _, _ = await watch.events(3)
    async with watching(api, apb.WatchAppointmentEventsRequest(after_cursor=first.cursor)) as watch:
        rest = await watch.events(2)
        await watch.quiet_for(0.3)
    assert [e.appointment.id for e in rest] == [b.id for b in booked[1:]]


async def test_idle_streams_get_heartbeats_whose_cursor_resumes_without_loss(api: Api) -> None:
    await _booking(api, 10)
    async with watching(api, BEGINNING) as watch:
        await watch.events(1)
        beats: list[apb.Heartbeat] = []
        while len(beats) < 2:
            message = await watch.next(wait=3)
            if message.WhichOneof("kind") == "heartbeat":
                beats.append(message.heartbeat)
    assert beats[-1].cursor and beats[-1].time.seconds > 0
    after = await _booking(api, 11)
    request = apb.WatchAppointmentEventsRequest(after_cursor=beats[-1].cursor)
    async with watching(api, request) as watch:
        (event,) = await watch.events(1)
    assert event.appointment.id == after.id


async def test_filters_select_by_specialist_user_appointment_and_type(api: Api) -> None:
    client, client_id = await api.client()
    spec_a = await api.specialist(name="A")
    spec_b = await api.specialist(name="B")
    a1 = await client.hold((await api.slot(spec_a.id, hours_from_now(10))).id)
    b1 = await api.hold((await api.slot(spec_b.id, hours_from_now(11))).id)
    await api.appointments.ConfirmAppointment(
        apb.ConfirmAppointmentRequest(id=b1.id), metadata=api.md
    )

    async def ids(filter_: apb.AppointmentEventFilter, count: int) -> list[tuple[str, int]]:
        request = apb.WatchAppointmentEventsRequest(
            start_position=apb.WATCH_START_POSITION_BEGINNING, filter=filter_
        )
        async with watching(api, request) as watch:
            got = await watch.events(count)
            await watch.quiet_for(0.3)
        return [(e.appointment.id, e.type) for e in got]

    held, confirmed = apb.APPOINTMENT_EVENT_TYPE_HELD, apb.APPOINTMENT_EVENT_TYPE_CONFIRMED
    assert await ids(apb.AppointmentEventFilter(specialist_id=spec_a.id), 1) == [(a1.id, held)]
    assert await ids(apb.AppointmentEventFilter(user_id=client_id), 1) == [(a1.id, held)]
    assert await ids(apb.AppointmentEventFilter(appointment_id=b1.id), 2) == [
        (b1.id, held),
        (b1.id, confirmed),
    ]
    assert await ids(apb.AppointmentEventFilter(types=[confirmed]), 1) == [(b1.id, confirmed)]


async def test_a_client_only_ever_sees_its_own_events(api: Api) -> None:
    client, client_id = await api.client()
    other, _ = await api.client()
    spec = await api.specialist()
    mine = await client.hold((await api.slot(spec.id, hours_from_now(10))).id)
    await other.hold((await api.slot(spec.id, hours_from_now(11))).id)
    async with watching(client, BEGINNING) as watch:
        (event,) = await watch.events(1)
        await other.hold((await api.slot(spec.id, hours_from_now(12))).id)
        await watch.quiet_for(0.5)
    assert event.appointment.id == mine.id and event.appointment.user_id == client_id
    async with expect_failure(grpc.StatusCode.PERMISSION_DENIED):
        request = apb.WatchAppointmentEventsRequest(
            filter=apb.AppointmentEventFilter(user_id=str(uuid.uuid4()))
        )
        await Watch(client, request).next()


async def test_an_open_older_transaction_holds_back_newer_events_instead_of_losing_them(
    api: Api, database_url: str
) -> None:
    spec = await api.specialist()
    early_slot = await api.slot(spec.id, hours_from_now(10))
    late_slot = await api.slot(spec.id, hours_from_now(11))
    (user_id,) = await insert_clients(database_url, 1)
    async with watching(api, apb.WatchAppointmentEventsRequest()) as watch:
        await watch.next()  # the opening heartbeat: the watch is live
        conn = await asyncpg.connect(database_url)
        try:
            tx = conn.transaction(isolation="repeatable_read")
            await tx.start()
            # Takes its xid first, commits last.
            await conn.fetchrow(
                HOLD_SLOT.statement(),
                *HOLD_SLOT.values(
                    slot_id=uuid.UUID(early_slot.id),
                    user_id=uuid.UUID(user_id),
                    priority="NORMAL",
                    actor_id=None,
                    hold_ttl=timedelta(minutes=5),
                    check_user_overlap=True,
                    request_id=None,
                    policy_exempt=True,
                    party_size=1,
                ),
            )
            later = await api.hold(late_slot.id)
            await watch.quiet_for(0.5)
            await tx.commit()
        finally:
            await conn.close()
        first, second = await watch.events(2)
    assert first.appointment.slot_id == early_slot.id
    assert second.appointment.id == later.id


async def test_stream_limit_is_resource_exhausted(database_url: str) -> None:
    config = ServerConfig.for_tests(database_url, max_streams=2)
    server = BookingServer(config)
    await server.start()
    try:
        async with Api.connect(server) as api:
            async with watching(api, BEGINNING) as w1, watching(api, BEGINNING) as w2:
                await w1.next()
                await w2.next()
                async with expect_failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS"):
                    await Watch(api, BEGINNING).next()
            # Cancelled streams give their places back.
            for _ in range(50):
                if server._hub is not None and server._hub.active_streams == 0:
                    break
                await asyncio.sleep(0.05)
            async with watching(api, BEGINNING) as w3:
                assert (await w3.next()).WhichOneof("kind") == "heartbeat"
    finally:
        await server.stop(grace=1)


async def test_an_event_committed_through_one_replica_reaches_a_watcher_on_another(
    database_url: str,
) -> None:
    config = ServerConfig.for_tests(database_url, event_poll_seconds=30)
    one, two = BookingServer(config), BookingServer(config)
    await one.start()
    await two.start()
    try:
        async with Api.connect(one) as api_one, Api.connect(two) as api_two:
            async with watching(api_two, apb.WatchAppointmentEventsRequest()) as watch:
                await watch.next()
                booked = await _booking(api_one, 10)
                # Polling is 30 s here, so this arrives by NOTIFY or not at all.
                (event,) = await watch.events(1, wait=5)
            assert event.appointment.id == booked.id
    finally:
        await one.stop(grace=1)
        await two.stop(grace=1)


async def test_a_slow_consumer_behind_the_ring_still_gets_everything_in_order(
    api: Api, database_url: str
) -> None:
    assert api.server._hub is not None
    api.server._hub.ring_size = 4  # tiny, so the consumer falls behind it
    spec = await api.specialist()
    async with watching(api, apb.WatchAppointmentEventsRequest()) as watch:
        await watch.next()
        booked = [
            await api.hold((await api.slot(spec.id, hours_from_now(10 + i))).id) for i in range(30)
        ]
        got = await watch.events(30)
    assert [e.appointment.id for e in got] == [b.id for b in booked]


async def test_list_events_pages_through_history_in_stream_order(
    api: Api, database_url: str
) -> None:
    for i in range(7):
        await _booking(api, 10 + i)
    seen: list[str] = []
    token = ""
    while True:
        reply = await api.appointments.ListAppointmentEvents(
            apb.ListAppointmentEventsRequest(page_size=3, page_token=token), metadata=api.md
        )
        seen += [e.id for e in reply.events]
        token = reply.next_page_token
        if not token:
            break
    rows = await fetch(database_url, "SELECT id FROM appointment_events ORDER BY xid, seq")
    assert seen == [str(r["id"]) for r in rows]


async def _random_lifecycle(
    api: Api, slots: list[str], user_id: str, rng: random.Random, committed: list[int]
) -> None:
    """Hold a random slot, then confirm/cancel/reschedule at random; count
    each successful transition."""

    async def attempt(coro: Any) -> Any:
        try:
            result = await coro
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
            return None
        committed[0] += 1
        return result

    for _ in range(8):
        held = await attempt(api.hold(rng.choice(slots), user_id=user_id))
        if held is None:
            continue
        appointment_id = held.id
        for _ in range(rng.randint(0, 3)):
            choice = rng.random()
            if choice < 0.35:
                await attempt(
                    api.appointments.ConfirmAppointment(
                        apb.ConfirmAppointmentRequest(id=appointment_id), metadata=api.md
                    )
                )
            elif choice < 0.7:
                await attempt(
                    api.appointments.RescheduleAppointment(
                        apb.RescheduleAppointmentRequest(
                            id=appointment_id, new_slot_id=rng.choice(slots)
                        ),
                        metadata=api.md,
                    )
                )
            else:
                await attempt(
                    api.appointments.CancelAppointment(
                        apb.CancelAppointmentRequest(id=appointment_id), metadata=api.md
                    )
                )
                break


async def test_stream_order_under_load_with_reconnects_is_exact(
    api: Api, database_url: str
) -> None:
    operator = api.as_(await api.make_token(Role.OPERATOR))
    spec = await api.specialist()
    slots = [(await api.slot(spec.id, hours_from_now(10 + i))).id for i in range(24)]
    users = await insert_clients(database_url, 16)
    committed = [0]
    rng = random.Random(1234)

    received: list[apb.AppointmentEvent] = []
    done = asyncio.Event()

    async def consume() -> None:
        cursor = ""
        reconnects = 0
        while True:
            request = (
                apb.WatchAppointmentEventsRequest(after_cursor=cursor) if cursor else BEGINNING
            )
            async with watching(operator, request) as watch:
                budget = rng.randint(5, 25)  # disconnect after this many events
                while budget > 0:
                    try:
                        message = await watch.next(wait=0.3)
                    except TimeoutError:
                        if done.is_set():
                            return
                        continue
                    if message.WhichOneof("kind") == "event":
                        received.append(message.event)
                        budget -= 1
                    cursor = watch.last_cursor
            reconnects += 1

    consumer = asyncio.create_task(consume())
    writers = [
        _random_lifecycle(operator, slots, users[i], random.Random(i), committed) for i in range(16)
    ]
    await asyncio.gather(*writers)
    # Let the consumer drain, then stop once it has been idle.
    done.set()
    await asyncio.wait_for(consumer, timeout=30)

    rows = await fetch(database_url, "SELECT id FROM appointment_events ORDER BY xid, seq")
    expected = [str(r["id"]) for r in rows]
    got = [e.id for e in received]
    assert len(got) == len(set(got)), "duplicates delivered"
    assert got == expected, "events missing or out of commit order"
    assert len(got) == committed[0]
    assert committed[0] > 20, "the writers must really have written"


async def test_the_first_stream_on_a_server_gets_its_backlog_without_waiting_for_a_heartbeat(
    database_url: str,
) -> None:
    # Heartbeats every 60 s: nothing but the hub's own wake-up can deliver
    # the history within the read's 5 s limit.
    async with running_server(database_url, heartbeat_seconds=60) as server:
        async with Api.connect(server) as api:
            booked = await _booking(api, 10)
            async with watching(api, BEGINNING) as watch:
                (event,) = await watch.events(1, wait=5)
        assert event.appointment.id == booked.id
