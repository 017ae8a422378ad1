"""A read whose connection is lost is tried again: the client gets its answer.

Every read RPC is made while the table it reads is locked (ACCESS EXCLUSIVE,
by a session of this test), so its statement is certainly in flight when
its backend is terminated; the retry's backend is terminated too, then the
lock is released. A read is retry-safe (Intent.READ), so the answer is OK,
never UNAVAILABLE. (A write in the same position answers UNAVAILABLE: it
might have committed; tests/test_database_faults.py.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from urllib.parse import urlsplit

import asyncpg
import pytest

from booking.v1 import appointment_pb2 as apb
from booking.v1 import schedule_pb2 as sched_pb
from booking.v1 import slot_pb2 as spb
from booking.v1 import specialist_pb2 as sppb
from booking.v1 import user_pb2 as upb
from booking.v1 import waitlist_pb2 as wpb
from tests.support import Api, hours_from_now, running_server, ts

# Terminations per call: its first attempt's backend and its retry's.
KILLS = 2


@pytest.fixture
async def quiet_api(database_url: str) -> AsyncIterator[Api]:
    """A server whose only statements are the calls' own: no sweeper and
    no event polling competing for the locked tables."""
    async with running_server(database_url, event_poll_seconds=3600.0) as server:
        async with Api.connect(server) as api:
            yield api


async def _terminated_twice(
    pg_admin_url: str, database_url: str, table: str, call: Callable[[], Awaitable[object]]
) -> object:
    """`call`'s result, made while `table` is locked; the backends of the
    service that wait on the lock are terminated, KILLS times."""
    name = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(pg_admin_url)
    locker = await asyncpg.connect(database_url)
    try:
        lock = locker.transaction()
        await lock.start()
        await locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        task = asyncio.ensure_future(call())
        killed = 0
        try:
            while killed < KILLS and not task.done():
                killed += int(
                    await admin.fetchval(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = $1 AND application_name = 'booking-service'"
                        " AND wait_event_type = 'Lock'",
                        name,
                    )
                )
                await asyncio.sleep(0.005)
        finally:
            await lock.rollback()
        # Without a retry the call has already failed (UNAVAILABLE), and
        # this raises it.
        result = await task
        assert killed >= KILLS, f"{killed} backends terminated under the call"
        return result
    finally:
        await locker.close()
        await admin.close()


async def test_every_read_rpc_answers_through_terminated_backends(
    quiet_api: Api, pg_admin_url: str, database_url: str
) -> None:
    api, md = quiet_api, quiet_api.md
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(30))
    client, client_id = await api.client()
    held = await client.hold(slot.id)
    start = hours_from_now(50)
    entry = await client.waitlist.CreateWaitlistEntry(
        wpb.CreateWaitlistEntryRequest(
            specialist_id=spec.id,
            window_start_time=ts(start),
            window_end_time=ts(start + timedelta(hours=3)),
        ),
        metadata=client.md,
    )
    entry_id = entry.waitlist_entry.id

    async def first_streamed_event() -> apb.AppointmentEvent:
        stream = api.appointments.WatchAppointmentEvents(
            apb.WatchAppointmentEventsRequest(start_position=apb.WATCH_START_POSITION_BEGINNING),
            metadata=md,
        )
        try:
            async for message in stream:
                if message.HasField("event"):
                    return message.event
            raise AssertionError("the stream ended")
        finally:
            stream.cancel()

    search = spb.SearchAvailableSlotsRequest(
        service_type="dentist",
        window_start_time=ts(hours_from_now(1)),
        window_end_time=ts(hours_from_now(24 * 6)),
    )
    reads: list[tuple[str, str, Callable[[], Awaitable[object]]]] = [
        (
            "GetUser",
            "users",
            lambda: api.users.GetUser(upb.GetUserRequest(id=client_id), metadata=md),
        ),
        ("ListUsers", "users", lambda: api.users.ListUsers(upb.ListUsersRequest(), metadata=md)),
        (
            "GetSpecialist",
            "specialists",
            lambda: api.specialists.GetSpecialist(
                sppb.GetSpecialistRequest(id=spec.id), metadata=md
            ),
        ),
        (
            "ListSpecialists",
            "specialists",
            lambda: api.specialists.ListSpecialists(sppb.ListSpecialistsRequest(), metadata=md),
        ),
        (
            "GetSlot",
            "time_slots",
            lambda: api.slots.GetSlot(spb.GetSlotRequest(id=slot.id), metadata=md),
        ),
        (
            "ListSlots",
            "time_slots",
            lambda: api.slots.ListSlots(spb.ListSlotsRequest(specialist_id=spec.id), metadata=md),
        ),
        (
            "SearchAvailableSlots",
            "time_slots",
            lambda: api.slots.SearchAvailableSlots(search, metadata=md),
        ),
        (
            "GetSchedule",
            "schedule_rules",
            lambda: api.schedules.GetSchedule(
                sched_pb.GetScheduleRequest(specialist_id=spec.id), metadata=md
            ),
        ),
        (
            "GetWaitlistEntry",
            "waitlist_entries",
            lambda: api.waitlist.GetWaitlistEntry(
                wpb.GetWaitlistEntryRequest(id=entry_id), metadata=md
            ),
        ),
        (
            "ListWaitlistEntries",
            "waitlist_entries",
            lambda: api.waitlist.ListWaitlistEntries(wpb.ListWaitlistEntriesRequest(), metadata=md),
        ),
        (
            "GetAppointment",
            "appointments",
            lambda: api.appointments.GetAppointment(
                apb.GetAppointmentRequest(id=held.id), metadata=md
            ),
        ),
        (
            "ListAppointments",
            "appointments",
            lambda: api.appointments.ListAppointments(apb.ListAppointmentsRequest(), metadata=md),
        ),
        (
            "ListAppointmentEvents",
            "appointment_events",
            lambda: api.appointments.ListAppointmentEvents(
                apb.ListAppointmentEventsRequest(), metadata=md
            ),
        ),
        ("WatchAppointmentEvents catch-up", "appointment_events", first_streamed_event),
    ]
    answered = []
    for name, table, call in reads:
        reply = await _terminated_twice(pg_admin_url, database_url, table, call)
        assert reply is not None, name
        answered.append(name)
    assert len(answered) == len(reads)
    # The appointment read back is the one held.
    reply = await _terminated_twice(
        pg_admin_url,
        database_url,
        "appointments",
        lambda: api.appointments.GetAppointment(apb.GetAppointmentRequest(id=held.id), metadata=md),
    )
    assert isinstance(reply, apb.GetAppointmentResponse) and reply.appointment.id == held.id
