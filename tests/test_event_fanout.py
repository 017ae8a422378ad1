"""The fan-out of one event to many streams: serialized once for all of
them, read at once after a quiet spell, and streams that wait cheaply
(docs/events.md, "Delivery inside a server")."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from booking.v1 import appointment_pb2 as apb
from booking.v1 import slot_pb2 as spb
from service.event_hub import PACE, pace_delay
from service.interceptor import _passing_bytes
from tests.support import Api, hours_from_now, ts
from tests.test_event_stream import watching

ALL = apb.WatchAppointmentEventsRequest()


def test_a_read_after_a_quiet_spell_starts_at_once_and_a_burst_shares_the_next() -> None:
    # Long after the previous read: no wait (it was PACE before every read).
    assert pace_delay(now=10.0, last_start=9.0) == 0.0
    assert pace_delay(now=10.0, last_start=10.0 - PACE) == 0.0
    # Woken again within PACE of the previous read: the rest of PACE, so
    # the commits of a burst share one read.
    assert abs(pace_delay(now=10.0, last_start=10.0 - PACE / 4) - PACE * 3 / 4) < 1e-12


def test_a_message_already_serialized_is_sent_as_it_is() -> None:
    serialize = _passing_bytes(apb.WatchAppointmentEventsResponse.SerializeToString)
    assert serialize is not None
    message = apb.WatchAppointmentEventsResponse(heartbeat=apb.Heartbeat(cursor="5-1"))
    assert serialize(message) == message.SerializeToString()
    wire = message.SerializeToString()
    assert serialize(wire) is wire
    assert _passing_bytes(None) is None


async def _two_day_series(api: Api, specialist_id: str) -> list[apb.Appointment]:
    first = hours_from_now(48).replace(minute=0, second=0, microsecond=0)
    reply = await api.slots.BatchCreateSlots(
        spb.BatchCreateSlotsRequest(
            requests=[
                spb.CreateSlotRequest(
                    specialist_id=specialist_id,
                    start_time=ts(first + timedelta(days=k)),
                    end_time=ts(first + timedelta(days=k, minutes=30)),
                )
                for k in range(2)
            ]
        ),
        metadata=api.md,
    )
    series = await api.appointments.HoldSeries(
        apb.HoldSeriesRequest(
            first_slot_id=reply.slots[0].id,
            recurrence="FREQ=DAILY;COUNT=2",
            mode=apb.SERIES_MODE_ALL_OR_NOTHING,
        ),
        metadata=api.md,
    )
    return [o.appointment for o in series.occurrences]


async def test_an_event_serialized_once_reaches_filtered_and_unfiltered_streams_alike(
    api: Api,
) -> None:
    """Every stream sends the one serialized copy of an event, so each must
    get exactly its own events: two events of one transaction (one xid, two
    seqs) stay two messages, and filters still choose per stream."""
    one, other = await api.specialist(), await api.specialist(name="Dr. No")
    async with (
        watching(api, ALL) as first,
        watching(api, ALL) as second,
        watching(
            api,
            apb.WatchAppointmentEventsRequest(
                filter=apb.AppointmentEventFilter(specialist_id=other.id)
            ),
        ) as filtered,
    ):
        for w in (first, second, filtered):
            await w.next()  # the opening heartbeat
        series = await _two_day_series(api, one.id)
        held = await api.hold((await api.slot(other.id, hours_from_now(30))).id)
        got_first = await first.events(3)
        got_second = await second.events(3)
        (got_filtered,) = await filtered.events(1)
        listed = await api.appointments.ListAppointmentEvents(
            apb.ListAppointmentEventsRequest(), metadata=api.md
        )
    expected = [a.id for a in series] + [held.id]
    assert [e.appointment.id for e in got_first] == expected
    assert got_first[0].cursor.split("-")[0] == got_first[1].cursor.split("-")[0]
    assert got_first[0].cursor != got_first[1].cursor
    assert got_second == got_first
    assert got_filtered == got_first[2]
    assert list(listed.events)[-3:] == got_first


async def test_streams_that_end_leave_no_waiter_behind_and_a_wake_releases_all(
    api: Api,
) -> None:
    hub = api.server._hub
    assert hub is not None
    spec = await api.specialist()
    async with (
        watching(api, ALL) as a,
        watching(api, ALL) as b,
        watching(api, ALL) as c,
    ):
        for w in (a, b, c):
            await w.next()
        booked = await api.hold((await api.slot(spec.id, hours_from_now(20))).id)
        for w in (a, b, c):
            (event,) = await w.events(1)
            assert event.appointment.id == booked.id
        # All three are waiting for news again, each with one future.
        for _ in range(200):
            if len(hub._waiters) == 3:
                break
            await asyncio.sleep(0.01)
        assert len(hub._waiters) == 3
    # Cancelled while waiting: each takes its own future away, and nothing
    # is left for a wake-up to release.
    for _ in range(200):
        if hub.active_streams == 0 and not hub._waiters:
            break
        await asyncio.sleep(0.01)
    assert hub.active_streams == 0
    assert not hub._waiters
