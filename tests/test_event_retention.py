"""Event retention: pruning old events, and readers resuming below what is
kept get OUT_OF_RANGE with the oldest cursor they may resume from."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import asyncpg
import grpc

from booking.v1 import appointment_pb2 as apb
from service.server import BookingServer
from storage import appointments as store
from storage.models import Position
from tests.support import Api, expect_failure, hours_from_now, running_server
from tests.test_event_stream import BEGINNING, watching

RETENTION = timedelta(hours=1)


async def _history(api: Api, count: int, **hold: str) -> list[apb.AppointmentEvent]:
    """`count` new HELD events, each on its own slot; returns the whole log."""
    spec = await api.specialist()
    for i in range(count):
        slot = await api.slot(spec.id, hours_from_now(10 + i))
        await api.hold(slot.id, **hold)
    reply = await api.appointments.ListAppointmentEvents(
        apb.ListAppointmentEventsRequest(page_size=1000), metadata=api.md
    )
    return list(reply.events)


async def _backdate(database_url: str, events: list[apb.AppointmentEvent]) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE appointment_events SET created_at = created_at - interval '2 days'"
            " WHERE id = ANY($1::uuid[])",
            [uuid.UUID(e.id) for e in events],
        )
    finally:
        await conn.close()


async def _prune(server: BookingServer) -> int:
    assert server.db is not None
    return await store.prune_events(server.db, RETENTION, 100)


async def _event_ids(database_url: str) -> set[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return {str(r["id"]) for r in await conn.fetch("SELECT id FROM appointment_events")}
    finally:
        await conn.close()


async def test_watch_after_a_pruned_cursor_is_out_of_range_and_names_the_oldest_cursor(
    api: Api, server: BookingServer, database_url: str
) -> None:
    old1, old2, kept = await _history(api, 3)
    await _backdate(database_url, [old1, old2])
    assert await _prune(server) == 2
    assert await _event_ids(database_url) == {kept.id}

    async with watching(api, apb.WatchAppointmentEventsRequest(after_cursor=old1.cursor)) as watch:
        async with expect_failure(grpc.StatusCode.OUT_OF_RANGE, "CURSOR_COMPACTED") as box:
            await watch.next()
    oldest = box[0].metadata["oldest_cursor"]
    assert oldest == old2.cursor

    # Resuming from the oldest cursor misses nothing that is kept.
    async with watching(api, apb.WatchAppointmentEventsRequest(after_cursor=oldest)) as watch:
        assert [e.id for e in await watch.events(1)] == [kept.id]
    # The beginning starts after the pruned history instead of failing.
    async with watching(api, BEGINNING) as watch:
        assert [e.id for e in await watch.events(1)] == [kept.id]
    # A cursor newer than the pruned history still resumes.
    async with watching(api, apb.WatchAppointmentEventsRequest(after_cursor=kept.cursor)) as w:
        assert (await w.next()).WhichOneof("kind") == "heartbeat"
        fresh = await api.hold((await api.slot((await api.specialist()).id, hours_from_now(30))).id)
        assert [e.appointment.id for e in await w.events(1)] == [fresh.id]


async def test_list_with_a_pruned_page_token_or_cursor_is_out_of_range(
    api: Api, server: BookingServer, database_url: str
) -> None:
    old1, old2, kept = await _history(api, 3)
    first = await api.appointments.ListAppointmentEvents(
        apb.ListAppointmentEventsRequest(page_size=1), metadata=api.md
    )
    assert [e.id for e in first.events] == [old1.id] and first.next_page_token
    await _backdate(database_url, [old1, old2])
    assert await _prune(server) == 2

    async with expect_failure(grpc.StatusCode.OUT_OF_RANGE, "CURSOR_COMPACTED") as box:
        await api.appointments.ListAppointmentEvents(
            apb.ListAppointmentEventsRequest(page_size=1, page_token=first.next_page_token),
            metadata=api.md,
        )
    assert box[0].metadata["oldest_cursor"] == old2.cursor
    async with expect_failure(grpc.StatusCode.OUT_OF_RANGE, "CURSOR_COMPACTED"):
        await api.appointments.ListAppointmentEvents(
            apb.ListAppointmentEventsRequest(after_cursor=old1.cursor), metadata=api.md
        )
    for request in (
        apb.ListAppointmentEventsRequest(),
        apb.ListAppointmentEventsRequest(after_cursor=old2.cursor),
    ):
        reply = await api.appointments.ListAppointmentEvents(request, metadata=api.md)
        assert [e.id for e in reply.events] == [kept.id]


async def test_events_a_request_id_still_names_are_kept_below_the_horizon(
    api: Api, server: BookingServer, database_url: str
) -> None:
    spec = await api.specialist()
    request_id = str(uuid.uuid4())
    slot = await api.slot(spec.id, hours_from_now(20))
    await api.hold(slot.id, request_id=request_id)
    named, plain = await _history(api, 1)
    await _backdate(database_url, [named, plain])

    assert await _prune(server) == 1
    assert await _event_ids(database_url) == {named.id}
    # The retry still replays the stored outcome.
    again = await api.hold(slot.id, request_id=request_id)
    assert again.slot_id == slot.id
    # The kept event lies at or before the horizon: readers starting at the
    # beginning start after it, like every reader of pruned history.
    reply = await api.appointments.ListAppointmentEvents(
        apb.ListAppointmentEventsRequest(), metadata=api.md
    )
    assert list(reply.events) == []
    async with watching(api, BEGINNING) as watch:
        await watch.quiet_for(0.3)


async def test_replicas_pruning_at_once_delete_each_event_once_without_errors(
    api: Api, server: BookingServer, database_url: str
) -> None:
    events = await _history(api, 40)
    await _backdate(database_url, events)
    async with running_server(database_url) as other:
        assert server.db is not None and other.db is not None
        dbs = [server.db, other.db] * 4

        async def prune_all(i: int) -> int:
            total = 0
            while True:
                done = await store.prune_events(dbs[i], RETENTION, 3)
                total += done
                if done == 0 and not await _event_ids(database_url):
                    return total
                await asyncio.sleep(0)

        counts = await asyncio.gather(*(prune_all(i) for i in range(len(dbs))))
    assert sum(counts) == len(events)
    assert await _event_ids(database_url) == set()


async def test_the_sweeper_prunes_only_when_a_retention_is_set(
    api: Api, server: BookingServer, database_url: str
) -> None:
    events = await _history(api, 2)
    await _backdate(database_url, events)
    # The default keeps everything.
    assert server.config.event_retention is None
    async with running_server(database_url, event_retention_hours=1.0, sweep_interval_seconds=0.05):
        for _ in range(200):
            if not await _event_ids(database_url):
                break
            await asyncio.sleep(0.05)
    assert await _event_ids(database_url) == set()


async def test_a_tail_left_behind_the_pruned_history_restarts_instead_of_stalling(
    api: Api, server: BookingServer, database_url: str
) -> None:
    old1, old2, kept = await _history(api, 3)
    await _backdate(database_url, [old1, old2])
    assert await _prune(server) == 2
    async with watching(api, apb.WatchAppointmentEventsRequest(after_cursor=kept.cursor)) as w:
        assert (await w.next()).WhichOneof("kind") == "heartbeat"
        # As if the tail had read nothing for longer than the retention.
        hub = server._hub  # noqa: SLF001
        assert hub is not None
        for _ in range(100):  # the tail wakes for the stream first
            if not hub._idle:  # noqa: SLF001
                break
            await asyncio.sleep(0.05)
        assert not hub._idle  # noqa: SLF001
        hub._head = Position(1, 1)  # noqa: SLF001
        fresh = await api.hold((await api.slot((await api.specialist()).id, hours_from_now(30))).id)
        assert [e.appointment.id for e in await w.events(1)] == [fresh.id]
