"""Nothing acknowledged is lost, and no phantom event is streamed, across a
failover to the synchronous standby.

A real primary streams to a real synchronous standby (tests/replication.py).
The standby is paused with SIGSTOP, so every commit on the primary waits for
its acknowledgement. A hold whose deadline runs out in that wait is cancelled
by the service (asyncpg sends a cancel request), and PostgreSQL then makes
the commit visible on the primary although the standby never got it. These
tests check that nothing passes that commit on as done: not a retry with the
same request id (a replay), not an event stream, not a wait cancelled by
anyone else; and that after the primary dies and the standby is promoted,
every OK answer and every delivered event is on the new primary.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg
import grpc
import pytest

from booking.v1 import appointment_pb2 as apb
from service.server import BookingServer
from storage.models import Role
from tests.replication import Node, ReplicatedCluster, replicated_cluster
from tests.support import Api, expect_failure, hours_from_now, running_server

# A deadline short enough for the test, long enough for a normal hold.
DEADLINE = 1.5
# Not answered OK: the deadline ran out while the replay waited for the
# standby (the service's own answer, or grpc's), or the service said so.
NOT_DONE = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}


@pytest.fixture
async def cluster() -> AsyncIterator[ReplicatedCluster]:
    async with replicated_cluster(1) as c:
        yield c


@asynccontextmanager
async def serving(cluster: ReplicatedCluster) -> AsyncIterator[BookingServer]:
    """A server on the cluster's primary. A failed check can leave a standby
    paused, and commits waiting for it would hold the server's shutdown:
    paused standbys are resumed first."""
    async with running_server(cluster.primary.url(), pool_max_size=10) as srv:
        try:
            yield srv
        finally:
            for node in cluster.standbys:
                if node.paused and not node.killed:
                    node.resume()


async def appointment_count(node: Node, slot_id: str) -> int:
    value = await node.fetchval(
        "SELECT count(*) FROM appointments WHERE time_slot_id = $1::uuid", slot_id
    )
    assert isinstance(value, int)
    return value


async def until_visible(node: Node, slot_id: str) -> None:
    """Until the cancelled hold's commit shows on `node` (the cancel request
    reached the backend waiting for the standby)."""
    while True:
        if await appointment_count(node, slot_id):
            return
        await asyncio.sleep(0.02)


async def until_waiting_for_standby(node: Node, query_like: str) -> int:
    """The pid of a backend whose commit waits for the synchronous standby
    and whose statement is like `query_like`."""
    while True:
        pid = await node.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND query LIKE $1"
            " LIMIT 1",
            query_like,
        )
        if isinstance(pid, int):
            return pid
        await asyncio.sleep(0.02)


async def hold_code(client: Api, slot_id: str, request_id: str, within: float) -> grpc.StatusCode:
    try:
        await client.appointments.HoldSlot(
            apb.HoldSlotRequest(slot_id=slot_id, request_id=request_id),
            metadata=client.md,
            timeout=within,
        )
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def setup(api: Api) -> tuple[Api, str]:
    """A CLIENT and a free slot, replicated."""
    specialist = await api.specialist()
    slot = await api.slot(specialist.id, hours_from_now(48))
    client, _ = await api.client()
    return client, slot.id


async def test_replayed_hold_is_not_ok_until_its_commit_is_on_the_standby(
    cluster: ReplicatedCluster,
) -> None:
    standby = cluster.standbys[0]
    async with serving(cluster) as srv, Api.connect(srv) as api:
        client, slot_id = await setup(api)
        request_id = str(uuid.uuid4())
        standby.pause()
        # The hold commits, waits for the paused standby, and the deadline
        # cancels the wait: committed locally, never replicated.
        assert await hold_code(client, slot_id, request_id, DEADLINE) in NOT_DONE
        await until_visible(cluster.primary, slot_id)
        # A retry finds the stored outcome; without the barrier it replays
        # it as OK although only the primary has it.
        for _ in range(2):
            assert await hold_code(client, slot_id, request_id, DEADLINE) in NOT_DONE
        standby.resume()
        # Once the standby has it, the replay answers OK...
        assert await hold_code(client, slot_id, request_id, 30) is grpc.StatusCode.OK
        # ...and the standby really has it.
        assert await appointment_count(standby, slot_id) == 1


async def test_acknowledged_holds_survive_promotion_of_the_standby(
    cluster: ReplicatedCluster,
) -> None:
    standby = cluster.standbys[0]
    acknowledged: list[str] = []
    async with serving(cluster) as srv, Api.connect(srv) as api:
        client, slot_id = await setup(api)
        token = client.token
        request_id = str(uuid.uuid4())
        standby.pause()
        assert await hold_code(client, slot_id, request_id, DEADLINE) in NOT_DONE
        await until_visible(cluster.primary, slot_id)
        for _ in range(2):
            code = await hold_code(client, slot_id, request_id, DEADLINE)
            if code is grpc.StatusCode.OK:
                acknowledged.append(request_id)
            assert code in NOT_DONE
        # The primary's machine dies; the standby, which never got the
        # hold, is promoted.
        cluster.fail_over(standby)
    async with serving(cluster) as srv, Api.connect(srv) as api:
        client = api.as_(token)
        # The retry applies the hold once on the new primary.
        assert await hold_code(client, slot_id, request_id, 30) is grpc.StatusCode.OK
        assert await appointment_count(cluster.primary, slot_id) == 1
        # And a second copy replays it.
        assert await hold_code(client, slot_id, request_id, 30) is grpc.StatusCode.OK
    assert acknowledged == []


async def test_commit_wait_cancelled_by_anyone_is_not_answered_ok(
    cluster: ReplicatedCluster,
) -> None:
    """Not only the service's deadline cancels a wait: an operator's
    pg_cancel_backend (or a cancel request arriving late) makes PostgreSQL
    report success with a warning. That success is UNAVAILABLE, never OK."""
    standby = cluster.standbys[0]
    async with serving(cluster) as srv, Api.connect(srv) as api:
        client, slot_id = await setup(api)
        request_id = str(uuid.uuid4())
        standby.pause()
        hold = asyncio.ensure_future(hold_code(client, slot_id, request_id, 60))
        pid = await until_waiting_for_standby(cluster.primary, "%booking_hold_slot%")
        await cluster.primary.execute("SELECT pg_cancel_backend($1)", pid, database="postgres")
        assert await hold is grpc.StatusCode.UNAVAILABLE
        assert await appointment_count(cluster.primary, slot_id) == 1
        standby.resume()
        assert await hold_code(client, slot_id, request_id, 30) is grpc.StatusCode.OK


async def test_stream_never_delivers_an_event_the_promoted_standby_lacks(
    cluster: ReplicatedCluster,
) -> None:
    standby = cluster.standbys[0]
    received: list[apb.AppointmentEvent] = []
    got_event = asyncio.Event()
    async with serving(cluster) as srv, Api.connect(srv) as api:
        operator = api.as_(await api.make_token(Role.ADMIN))
        token = operator.token
        client, slot_id = await setup(api)
        call = operator.appointments.WatchAppointmentEvents(
            apb.WatchAppointmentEventsRequest(start_position=apb.WATCH_START_POSITION_NOW),
            metadata=operator.md,
        )
        opening = await call.read()
        assert isinstance(opening, apb.WatchAppointmentEventsResponse)
        cursor = opening.heartbeat.cursor

        async def consume() -> None:
            nonlocal cursor
            while True:
                # read(), not async for: a call is read one way only.
                message = await call.read()
                assert isinstance(message, apb.WatchAppointmentEventsResponse)
                if message.HasField("event"):
                    received.append(message.event)
                    got_event.set()
                    cursor = message.event.cursor
                else:
                    cursor = message.heartbeat.cursor

        consumer = asyncio.ensure_future(consume())
        standby.pause()
        assert await hold_code(client, slot_id, str(uuid.uuid4()), DEADLINE) in NOT_DONE
        await until_visible(cluster.primary, slot_id)
        # The event is visible on the primary. Without the gate the hub
        # reads and delivers it at once; with it, the hub's read waits for
        # the standby. Either shows within the wait below.
        waiting = asyncio.ensure_future(
            until_waiting_for_standby(cluster.primary, "%booking_sync_barrier%")
        )
        # Kept and cancelled below: a pending task nobody holds is destroyed
        # by a later garbage collection, which asyncio logs as an error
        # during whatever test runs then.
        delivered = asyncio.ensure_future(got_event.wait())
        await asyncio.wait([waiting, delivered], return_when=asyncio.FIRST_COMPLETED)
        if consumer.done():
            consumer.result()  # the consumer must not have died
        for task in (waiting, delivered, consumer):
            task.cancel()
        call.cancel()
        assert received == [], "an event only the primary has was streamed"
        cluster.fail_over(standby)
    async with serving(cluster) as srv, Api.connect(srv) as api:
        operator = api.as_(token)
        client = api.as_(client.token)
        # The consumer resumes from its last cursor; a new hold on the new
        # primary arrives, and nothing it gets is missing from the new primary.
        assert await hold_code(client, slot_id, str(uuid.uuid4()), 30) is grpc.StatusCode.OK
        call = operator.appointments.WatchAppointmentEvents(
            apb.WatchAppointmentEventsRequest(after_cursor=cursor), metadata=operator.md
        )
        async for message in call:
            if message.HasField("event"):
                received.append(message.event)
                break
        call.cancel()
        assert len(received) == 1
        conn = await asyncpg.connect(cluster.primary.url(), ssl=False)
        try:
            for event in received:
                assert (
                    await conn.fetchval(
                        "SELECT count(*) FROM appointment_events WHERE id = $1::uuid", event.id
                    )
                    == 1
                )
        finally:
            await conn.close()


async def test_start_warns_when_commits_are_not_synchronously_replicated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with replicated_cluster(1, synchronous=False) as cluster:
        caplog.set_level(logging.WARNING, logger="storage.durability")
        async with serving(cluster):
            pass
        warnings = [r.getMessage() for r in caplog.records if r.name == "storage.durability"]
        assert len(warnings) == 1
        assert "synchronous_standby_names is empty" in warnings[0]
        # Synchronous: nothing to warn about.
        await cluster.set_synchronous("ANY 1 (standby1)")
        caplog.clear()
        async with serving(cluster):
            pass
        assert [r for r in caplog.records if r.name == "storage.durability"] == []
        # Synchronous, but the standby is gone: commits would hang.
        cluster.standbys[0].kill()
        async with serving(cluster):
            pass
        warnings = [r.getMessage() for r in caplog.records if r.name == "storage.durability"]
        assert len(warnings) == 1
        assert "no synchronous standby is connected" in warnings[0]


async def test_cursor_lost_in_a_failover_is_out_of_range_and_a_surviving_one_resumes() -> None:
    """Asynchronous replication (nothing waits for the standby): a hold the
    standby never received is streamed, then the standby is promoted. Its
    cursor names an event the new primary does not have, and the new
    primary reuses the lost xids, so resuming there could skip what it
    writes: it is OUT_OF_RANGE with the position to start again from. A
    cursor from the surviving history resumes exactly."""
    async with replicated_cluster(1, synchronous=False) as cluster:
        standby = cluster.standbys[0]
        async with serving(cluster) as srv, Api.connect(srv) as api:
            operator = api.as_(await api.make_token(Role.ADMIN))
            client, slot_id = await setup(api)
            specialist = await api.specialist()
            other = await api.slot(specialist.id, hours_from_now(72))
            survived = await first_event(operator, "", lambda: client.hold(other.id))
            lsn = await cluster.primary.fetchval("SELECT pg_current_wal_lsn()::text")
            await cluster.wait_replayed(standby, str(lsn))
            standby.pause()
            lost = await first_event(operator, survived.cursor, lambda: client.hold(slot_id))
            cluster.fail_over(standby)
        async with serving(cluster) as srv, Api.connect(srv) as api:
            operator = api.as_(operator.token)
            client = api.as_(client.token)
            # The new primary writes an event, at an xid the lost tail had
            # used or close to it.
            third = await api.slot(specialist.id, hours_from_now(96))
            await client.hold(third.id)
            # Resumed from the lost cursor, the stream would skip that event
            # if it lies below the cursor (and wait here for one that never
            # comes: the bound only ends such a wait), or deliver it as if
            # the lost one had happened.
            async with (
                asyncio.timeout(30),
                expect_failure(grpc.StatusCode.OUT_OF_RANGE, "CURSOR_NOT_IN_HISTORY") as box,
            ):
                await first_event(operator, lost.cursor, lambda: asyncio.sleep(0))
            # Listing from it is refused the same way.
            async with expect_failure(grpc.StatusCode.OUT_OF_RANGE, "CURSOR_NOT_IN_HISTORY"):
                await operator.appointments.ListAppointmentEvents(
                    apb.ListAppointmentEventsRequest(after_cursor=lost.cursor),
                    metadata=operator.md,
                )
            restart = box[0].metadata["restart_cursor"]
            assert box[0].metadata["cursor"] == lost.cursor
            # From the surviving cursor the stream resumes exactly: the new
            # primary's event is next. From the restart cursor it starts again.
            again = await first_event(operator, survived.cursor, lambda: asyncio.sleep(0))
            assert again.appointment.slot_id == third.id
            assert again.id != lost.id
            restarted = await first_event(operator, restart, lambda: asyncio.sleep(0))
            assert restarted.id != lost.id


async def first_event(
    operator: Api, after: str, cause: Callable[[], Awaitable[object]]
) -> apb.AppointmentEvent:
    """The first event a stream from `after` ('' for the beginning) gets,
    with `cause` run once the stream is open."""
    request = (
        apb.WatchAppointmentEventsRequest(after_cursor=after)
        if after
        else apb.WatchAppointmentEventsRequest(start_position=apb.WATCH_START_POSITION_NOW)
    )
    call = operator.appointments.WatchAppointmentEvents(request, metadata=operator.md)
    try:
        opening = await call.read()
        assert isinstance(opening, apb.WatchAppointmentEventsResponse)
        await cause()
        while True:
            message = await call.read()
            assert isinstance(message, apb.WatchAppointmentEventsResponse)
            if message.HasField("event"):
                return message.event
    finally:
        call.cancel()
