"""The event stream served from hot standbys (docs/events.md, "Reading from
a standby").

Real standbys made with pg_basebackup stream from a real primary
(tests/replication.py). A server reads the log from a standby
(its read URL names the standby): its rows come from the standby, the durability gate runs
on the primary, and its streams wake when the standby's replay position
moves. These tests show that such a consumer gets exactly the primary's
sequence (concurrent writers, commits out of xid order), that the snapshot
facts the horizon relies on hold on a standby, that nothing is delivered
that a failover to the synchronous standby would take back, that streams
wake without LISTEN, and that cursors resume across standbys and
promotions or are refused explicitly.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from booking.v1 import appointment_pb2 as apb
from service.server import BookingServer
from storage import events as event_store
from storage.database import Database
from storage.errors import DatabaseUnavailable
from storage.functions import HOLD_SLOT
from storage.models import EventFilter, Position
from tests.population import insert_clients
from tests.replication import Node, ReplicatedCluster, replicated_cluster
from tests.support import Api, ServerConfig, expect_failure, hours_from_now, running_server

BEGINNING = apb.WatchAppointmentEventsRequest(start_position=apb.WATCH_START_POSITION_BEGINNING)
NOW = apb.WatchAppointmentEventsRequest(start_position=apb.WATCH_START_POSITION_NOW)
# A hang guard, not a latency assertion: what the tests wait for arrives in
# milliseconds, or (without the mechanism under test) never.
PATIENCE = 30.0


@asynccontextmanager
async def standby_server(
    cluster: ReplicatedCluster, standby: Node, replay_poll: float = 0.005, **overrides: Any
) -> AsyncIterator[BookingServer]:
    """A server whose event log is read from `standby`."""
    # The read URL names this standby alone; a lag bound far above any
    # delay a test sets keeps the reads there.
    config = ServerConfig.for_tests(
        cluster.primary.url(),
        pool_max_size=8,
        read_database_url=standby.url(),
        read_max_lag_seconds=3600.0,
        event_replay_poll_seconds=replay_poll,
        **overrides,
    )
    server = BookingServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=1)
        for node in cluster.standbys:
            if node.paused and not node.killed:
                node.resume()


class Consumer:
    """One open WatchAppointmentEvents call, pumped into a queue."""

    def __init__(self, api: Api, request: apb.WatchAppointmentEventsRequest) -> None:
        self.call = api.appointments.WatchAppointmentEvents(request, metadata=api.md)
        self.events: list[apb.AppointmentEvent] = []
        self.arrived: list[float] = []
        self.cursor = ""
        self.heartbeats: list[str] = []
        self._changed = asyncio.Event()
        self.error: grpc.aio.AioRpcError | None = None
        self._pump_task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        try:
            async for message in self.call:
                if message.HasField("event"):
                    self.events.append(message.event)
                    self.arrived.append(time.perf_counter())
                    self.cursor = message.event.cursor
                else:
                    self.heartbeats.append(message.heartbeat.cursor)
                    self.cursor = message.heartbeat.cursor
                self._changed.set()
        except grpc.aio.AioRpcError as err:
            self.error = err
            self._changed.set()

    async def until(self, count: int) -> list[apb.AppointmentEvent]:
        async with asyncio.timeout(PATIENCE):
            while len(self.events) < count:
                if self.error is not None:
                    raise self.error
                self._changed.clear()
                await self._changed.wait()
        return self.events

    async def first_message(self) -> None:
        async with asyncio.timeout(PATIENCE):
            while not self.heartbeats and not self.events:
                if self.error is not None:
                    raise self.error
                self._changed.clear()
                await self._changed.wait()

    def close(self) -> None:
        self.call.cancel()
        self._pump_task.cancel()


@asynccontextmanager
async def consuming(
    api: Api, request: apb.WatchAppointmentEventsRequest
) -> AsyncIterator[Consumer]:
    consumer = Consumer(api, request)
    try:
        await consumer.first_message()
        yield consumer
    finally:
        consumer.close()


async def history(node: Node) -> list[str]:
    """Every event's cursor on `node`, in (xid, seq) order."""
    conn = await asyncpg.connect(node.url(), ssl=False)
    try:
        rows = await conn.fetch(
            "SELECT xid::text || '-' || seq AS c FROM appointment_events ORDER BY xid, seq"
        )
    finally:
        await conn.close()
    return [r["c"] for r in rows]


async def replicated(cluster: ReplicatedCluster, standby: Node) -> None:
    """Until `standby` has replayed everything the primary has written."""
    lsn = await cluster.primary.fetchval("SELECT pg_current_wal_insert_lsn()::text")
    await cluster.wait_replayed(standby, str(lsn))


async def until_held_on(node: Node, slot_id: str) -> None:
    """Until `node` shows an event of a hold of `slot_id`."""
    while True:
        if await node.fetchval(
            "SELECT count(*) FROM appointment_events WHERE time_slot_id = $1::uuid", slot_id
        ):
            return
        await asyncio.sleep(0.02)


async def free_slots(api: Api, count: int) -> list[str]:
    specialist = await api.specialist()
    return [(await api.slot(specialist.id, hours_from_now(24 + i))).id for i in range(count)]


async def open_hold(conn: asyncpg.Connection, slot_id: str, user_id: str) -> asyncpg.Transaction:
    """A hold in a transaction left open: it has taken its xid."""
    tx = conn.transaction(isolation="repeatable_read")
    await tx.start()
    await conn.fetchrow(
        HOLD_SLOT.statement(),
        *HOLD_SLOT.values(
            slot_id=uuid.UUID(slot_id),
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
    return tx


@pytest.fixture
async def cluster() -> AsyncIterator[ReplicatedCluster]:
    async with replicated_cluster(1) as c:
        yield c


@pytest.fixture
async def cluster2() -> AsyncIterator[ReplicatedCluster]:
    async with replicated_cluster(2) as c:
        yield c


async def test_snapshot_facts_on_a_standby(cluster: ReplicatedCluster) -> None:
    """xmin/xmax are right on a standby, the in-progress list is empty (so
    pg_visible_in_snapshot lies), pg_current_xact_id and LISTEN are refused,
    and reading below xmin holds a late commit back there too."""
    standby = cluster.standbys[0]
    primary_conn = await asyncpg.connect(cluster.primary.url(), ssl=False)
    standby_conn = await asyncpg.connect(standby.url(), ssl=False)
    writer = await asyncpg.connect(cluster.primary.url(), ssl=False)
    db = await Database.connect(standby.url(), min_size=1, max_size=2)
    gate = await Database.connect(cluster.primary.url(), min_size=1, max_size=2)
    try:
        async with running_server(cluster.primary.url()) as srv, Api.connect(srv) as api:
            early, late = await free_slots(api, 2)
            (user_id,) = await insert_clients(cluster.primary.url(), 1)
            tx = await open_hold(writer, early, user_id)
            open_xid = int(await writer.fetchval("SELECT pg_current_xact_id()::text::bigint"))
            newer = await api.hold(late)
            await replicated(cluster, standby)
            on_primary = await primary_conn.fetchrow(
                "SELECT pg_snapshot_xmin(s)::text::bigint AS xmin,"
                " pg_snapshot_xmax(s)::text::bigint AS xmax,"
                " array(SELECT pg_snapshot_xip(s)::text::bigint) AS xip,"
                " pg_visible_in_snapshot($1::text::xid8, s) AS visible"
                " FROM pg_current_snapshot() s",
                str(open_xid),
            )
            on_standby = await standby_conn.fetchrow(
                "SELECT pg_snapshot_xmin(s)::text::bigint AS xmin,"
                " pg_snapshot_xmax(s)::text::bigint AS xmax,"
                " array(SELECT pg_snapshot_xip(s)::text::bigint) AS xip,"
                " pg_visible_in_snapshot($1::text::xid8, s) AS visible"
                " FROM pg_current_snapshot() s",
                str(open_xid),
            )
            assert on_primary["xmin"] == on_standby["xmin"] == open_xid
            assert on_standby["xmax"] == on_primary["xmax"]
            assert open_xid in on_primary["xip"] and not on_primary["visible"]
            # The in-progress list is empty during recovery: a rule using it,
            # or pg_visible_in_snapshot, takes the open transaction as done.
            assert on_standby["xip"] == [] and on_standby["visible"]
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await standby_conn.fetchval("SELECT pg_current_xact_id()")
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await standby_conn.execute(f"LISTEN {event_store.CHANNEL}")
            # Below xmin: the newer, committed hold is held back on the
            # standby, and the position handed out is before both.
            events, reached, pending = await event_store.read_after(
                db, Position.start(), EventFilter(), 100, gate=gate
            )
            assert events == [] and pending and reached == Position.start()
            head = await event_store.stable_head(db, gate=gate)
            assert head == Position.start()
            await tx.commit()
            await replicated(cluster, standby)
            events, reached, pending = await event_store.read_after(
                db, Position.start(), EventFilter(), 100, gate=gate
            )
            assert [e.appointment.slot_id for e in events] == [
                uuid.UUID(early),
                uuid.UUID(newer.slot_id),
            ]
            assert [f"{e.position.xid}-{e.position.seq}" for e in events] == await history(
                cluster.primary
            )
            assert reached == events[-1].position and not pending
    finally:
        await db.close()
        await gate.close()
        for conn in (primary_conn, standby_conn, writer):
            await conn.close()


async def test_a_standby_consumer_sees_the_primary_sequence_under_concurrent_writers(
    cluster: ReplicatedCluster,
) -> None:
    """Consumers on the primary and on a standby, transactions committing in
    the reverse of their xid order among concurrent holds: both get the
    primary's history, same positions, same order, no gap, no duplicate;
    ListAppointmentEvents from the standby pages through the same; and a
    standby's heartbeat cursor never passes an open older transaction."""
    standby = cluster.standbys[0]
    late_commits = 6
    concurrent = 40
    async with (
        running_server(cluster.primary.url(), pool_max_size=12) as primary_srv,
        standby_server(cluster, standby) as standby_srv,
        Api.connect(primary_srv) as api,
        Api.connect(standby_srv) as on_standby,
    ):
        slots = await free_slots(api, late_commits + concurrent + 1)
        users = await insert_clients(cluster.primary.url(), late_commits)
        writers = [
            await asyncpg.connect(cluster.primary.url(), ssl=False) for _ in range(late_commits)
        ]
        try:
            async with consuming(api, BEGINNING) as here, consuming(on_standby, BEGINNING) as there:
                # Each takes its xid in turn, and they commit last-first.
                txs = [
                    await open_hold(conn, slot, user)
                    for conn, slot, user in zip(writers, slots[:late_commits], users, strict=True)
                ]
                first = await api.hold(slots[late_commits])
                await replicated(cluster, standby)
                # Held back on the standby: an older transaction is open, so
                # nothing is delivered and heartbeats stay before it.
                await asyncio.sleep(1.2)  # a few heartbeats (0.5 s apart)
                assert there.events == [] and here.events == []
                assert set(there.heartbeats) == {"0-0"}
                holds = [api.hold(slot) for slot in slots[late_commits + 1 :]]
                commits = [tx.commit() for tx in reversed(txs)]
                mixed: list[Any] = []
                for pair in zip(holds[: len(commits)], commits, strict=False):
                    mixed.extend(pair)
                mixed.extend(holds[len(commits) :])
                await asyncio.gather(*mixed)
                total = late_commits + concurrent + 1
                from_primary = [e.cursor for e in await here.until(total)]
                from_standby = [e.cursor for e in await there.until(total)]
            truth = await history(cluster.primary)
            assert len(truth) == total
            assert from_primary == truth
            assert from_standby == truth
            assert first.id in {e.appointment.id for e in there.events}
            paged: list[str] = []
            token = ""
            while True:
                page = await on_standby.appointments.ListAppointmentEvents(
                    apb.ListAppointmentEventsRequest(page_size=7, page_token=token),
                    metadata=on_standby.md,
                )
                paged.extend(e.cursor for e in page.events)
                token = page.next_page_token
                if not token:
                    break
            assert paged == truth
        finally:
            for conn in writers:
                await conn.close()


async def test_an_asynchronous_standby_never_streams_what_the_synchronous_one_lacks(
    cluster2: ReplicatedCluster,
) -> None:
    """standby1 is synchronous and paused; standby2 is asynchronous and
    replays a hold whose commit waits for standby1 (then is cancelled into
    a local commit). A consumer reading standby2 is not sent it (the gate
    on the primary waits for standby1), and after the failover to standby1
    it never happened."""
    sync, async_ = cluster2.standby("standby1"), cluster2.standby("standby2")
    await cluster2.set_synchronous("FIRST 1 (standby1)")
    async with (
        running_server(cluster2.primary.url()) as primary_srv,
        Api.connect(primary_srv) as api,
    ):
        (slot,) = await free_slots(api, 1)
        client, _ = await api.client()
        async with (
            standby_server(cluster2, async_) as standby_srv,
            Api.connect(standby_srv) as on_standby,
            consuming(on_standby, NOW) as consumer,
        ):
            sync.pause()
            try:
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await client.appointments.HoldSlot(
                        apb.HoldSlotRequest(slot_id=slot), metadata=client.md, timeout=1.5
                    )
                assert failed.value.code() in {
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.UNAVAILABLE,
                }
                # The hold is on the asynchronous standby...
                await until_held_on(async_, slot)
                # ...and the standby server's gate waits on the primary for
                # the paused synchronous standby; or (without the gate) the
                # event is delivered. Whichever comes first.
                async with asyncio.timeout(PATIENCE):
                    while not consumer.events:
                        waiting = await cluster2.primary.fetchval(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
                            " AND query LIKE '%booking_sync_barrier%'"
                        )
                        if waiting:
                            break
                        await asyncio.sleep(0.02)
                assert consumer.events == [], "a hold the synchronous standby lacks was streamed"
            finally:
                cluster2.fail_over(sync)
    assert await history(cluster2.primary) == []


async def test_a_cursor_resumes_on_a_lagging_standby_and_after_its_promotion(
    cluster2: ReplicatedCluster,
) -> None:
    """A cursor from standby1 resumed on standby2, which has not replayed
    its event yet, waits there (no false CURSOR_NOT_IN_HISTORY) and then
    continues exactly; after standby1 is promoted, the new primary resumes
    the last cursor exactly."""
    one, two = cluster2.standby("standby1"), cluster2.standby("standby2")
    async with (
        running_server(cluster2.primary.url()) as primary_srv,
        Api.connect(primary_srv) as api,
    ):
        token = api.token
        slots = await free_slots(api, 6)
        async with (
            standby_server(cluster2, one) as srv1,
            standby_server(cluster2, two) as srv2,
            Api.connect(srv1) as on_one,
            Api.connect(srv2) as on_two,
        ):
            on_one, on_two = on_one.as_(token), on_two.as_(token)
            for slot in slots[:2]:
                await api.hold(slot)
            async with consuming(on_one, BEGINNING) as first:
                await first.until(2)
                await cluster2.set_apply_delay(two, "3s")
                await api.hold(slots[2])
                (_, _, third) = await first.until(3)
                cursor = third.cursor
            # standby2 has not replayed the third hold: the cursor's event
            # is not there yet.
            assert cursor not in await history(two)
            async with consuming(
                on_two, apb.WatchAppointmentEventsRequest(after_cursor=cursor)
            ) as second:
                await api.hold(slots[3])
                (fourth,) = await second.until(1)
                await cluster2.set_apply_delay(two, "0")
                await api.hold(slots[4])
                await second.until(2)
                assert second.error is None
            truth = await history(cluster2.primary)
            assert [e.cursor for e in second.events] == truth[3:5]
            assert fourth.cursor == truth[3]
            await replicated(cluster2, one)
        cluster2.fail_over(one)
    async with (
        running_server(cluster2.primary.url()) as new_srv,
        Api.connect(new_srv) as api,
    ):
        api = api.as_(token)
        await api.hold(slots[5])
        async with consuming(api, apb.WatchAppointmentEventsRequest(after_cursor=truth[4])) as c:
            (sixth,) = await c.until(1)
        assert sixth.appointment.slot_id == slots[5]
        assert (await history(cluster2.primary))[5] == sixth.cursor


async def test_a_cursor_from_a_standby_a_failover_lost_is_out_of_range(
    cluster2: ReplicatedCluster,
) -> None:
    """Asynchronous replication: standby1 streams a hold that the paused
    standby2 never receives; standby2 is promoted. The consumer's cursor is
    answered OUT_OF_RANGE CURSOR_NOT_IN_HISTORY with a restart cursor, on
    the new primary, never resumed silently."""
    one, two = cluster2.standby("standby1"), cluster2.standby("standby2")
    await cluster2.set_synchronous("")
    async with (
        running_server(cluster2.primary.url()) as primary_srv,
        Api.connect(primary_srv) as api,
    ):
        token = api.token
        slots = await free_slots(api, 3)
        await api.hold(slots[0])
        await replicated(cluster2, two)
        two.pause()
        async with standby_server(cluster2, one) as srv1, Api.connect(srv1) as on_one:
            on_one = on_one.as_(token)
            await api.hold(slots[1])
            async with consuming(on_one, BEGINNING) as consumer:
                (_, lost) = await consumer.until(2)
            cluster2.fail_over(two)
    async with running_server(cluster2.primary.url()) as new_srv, Api.connect(new_srv) as api:
        api = api.as_(token)
        await api.hold(slots[2])  # the new primary may reuse the lost xid
        request = apb.WatchAppointmentEventsRequest(after_cursor=lost.cursor)
        async with expect_failure(grpc.StatusCode.OUT_OF_RANGE, "CURSOR_NOT_IN_HISTORY") as info:
            call = api.appointments.WatchAppointmentEvents(request, metadata=api.md)
            async for _ in call:
                pass
        assert info[0].metadata["cursor"] == lost.cursor
        assert info[0].metadata["restart_cursor"] == "0-0"


async def test_a_standby_stream_wakes_from_the_replay_position_without_listen(
    cluster: ReplicatedCluster,
) -> None:
    """Events written straight into the primary (no NOTIFY from any
    server) with the tail's own poll an hour apart: only the standby's
    replay position can wake the stream."""
    standby = cluster.standbys[0]
    async with (
        running_server(cluster.primary.url()) as primary_srv,
        Api.connect(primary_srv) as api,
        standby_server(cluster, standby, event_poll_seconds=3600.0) as srv,
        Api.connect(srv) as on_standby,
    ):
        slots = await free_slots(api, 2)
        users = await insert_clients(cluster.primary.url(), 2)
        async with consuming(on_standby.as_(api.token), NOW) as consumer:
            conn = await asyncpg.connect(cluster.primary.url(), ssl=False)
            try:
                for slot, user in zip(slots, users, strict=True):
                    tx = await open_hold(conn, slot, user)
                    await tx.commit()
            finally:
                await conn.close()
            events = await consumer.until(2)
    assert [e.cursor for e in events] == await history(cluster.primary)


async def test_delivery_latency_primary_listen_versus_standby_replay_poll(
    cluster: ReplicatedCluster,
) -> None:
    """Figures, not assertions: from a hold's answer to its event on a
    stream served from the primary (woken by the server's own commit) and
    on one served from a synchronous standby (replay polled every 5 ms)."""
    standby = cluster.standbys[0]
    rounds = 100
    async with (
        running_server(cluster.primary.url()) as primary_srv,
        standby_server(cluster, standby) as standby_srv,
        Api.connect(primary_srv) as api,
        Api.connect(standby_srv) as on_standby,
    ):
        slots = await free_slots(api, rounds)
        async with (
            consuming(api, NOW) as here,
            consuming(on_standby.as_(api.token), NOW) as there,
        ):
            answered: list[float] = []
            for i, slot in enumerate(slots):
                await api.hold(slot)
                answered.append(time.perf_counter())
                await here.until(i + 1)
                await there.until(i + 1)
    primary_ms = sorted((a - t) * 1000 for a, t in zip(here.arrived, answered, strict=True))
    standby_ms = sorted((a - t) * 1000 for a, t in zip(there.arrived, answered, strict=True))
    assert [e.cursor for e in here.events] == [e.cursor for e in there.events]
    for name, values in (("primary (LISTEN)", primary_ms), ("standby (replay poll)", standby_ms)):
        print(
            f"{name}: median {statistics.median(values):.2f} ms,"
            f" p90 {values[int(len(values) * 0.9)]:.2f} ms, max {values[-1]:.2f} ms"
        )


async def test_a_standby_read_is_refused_while_the_primary_cannot_gate_it(
    cluster: ReplicatedCluster,
) -> None:
    """The gate on the primary is part of every standby read: with the
    primary gone the standby's rows are not delivered (UNAVAILABLE to the
    caller), however complete they look."""
    standby = cluster.standbys[0]
    db = await Database.connect(standby.url(), min_size=1, max_size=2)
    gate = await Database.connect(cluster.primary.url(), min_size=1, max_size=2)
    try:
        assert await event_store.stable_head(db, gate=gate) == Position.start()
        cluster.primary.kill()
        with pytest.raises(DatabaseUnavailable):
            await event_store.stable_head(db, gate=gate)
    finally:
        await db.close()
        await gate.close()
